"""The sockets of ``maas serve --workers N``: each worker binds the shared HTTP port itself with SO_REUSEPORT (the
kernel spreads connections over them), and serves its supervisor on a private Unix socket.

A socket that is bound but not listening takes no connections: a worker can hold the port's sockets and start
listening (join the group) only once its models are loaded.
"""

from __future__ import annotations

import contextlib
import socket

from maas.errors import MaasError


class PortInUse(MaasError):
    """The port another process listens on already."""


def _addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[object, ...]]]:
    """What ``asyncio``'s ``create_server(host=, port=)`` binds, so workers listen where one process would."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[tuple[socket.AddressFamily, tuple[object, ...]]] = []
    for family, _, _, _, addr in infos:
        if (family, addr) not in out:
            out.append((family, addr))
    return out


def _socket(family: socket.AddressFamily, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def claim_port(host: str, port: int, what: str, option: str) -> int:
    """Check that ``port`` is free on ``host`` (0: pick a free one) and return it; nothing stays bound.

    The check binds without SO_REUSEPORT, so it fails on a port any socket holds, even another server's that
    could share it: two ``maas serve`` never split one port between them by accident.
    """
    for family, addr in _addresses(host, port):
        sock = _socket(family, reuse_port=False)
        try:
            sock.bind((addr[0], port, *addr[2:]))
            port = sock.getsockname()[1]
        except OSError as exc:
            raise PortInUse(
                f"the {what} port {port} on {host} is taken ({exc.strerror}); stop what listens there "
                f"(`ss -ltnp 'sport = :{port}'` shows it) or choose another with {option}"
            ) from None
        finally:
            sock.close()
    return port


def shared_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, not yet listening, SO_REUSEPORT sockets for ``host:port`` (every address ``host`` resolves to)."""
    socks: list[socket.socket] = []
    try:
        for family, addr in _addresses(host, port):
            sock = _socket(family, reuse_port=True)
            socks.append(sock)
            sock.bind(addr)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def control_socket(path: str) -> socket.socket:
    """The worker's private Unix socket: its supervisor asks it (and only it) whether it is ready."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.setblocking(False)
    return sock


def probe(path: str, target: str, timeout_s: float) -> int:
    """The status code of ``GET target`` over the Unix socket at ``path``; 0 if it does not answer in time."""
    request = f"GET {target} HTTP/1.1\r\nhost: worker\r\nconnection: close\r\n\r\n".encode()
    with contextlib.suppress(OSError, ValueError, IndexError), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(request)
        head = sock.recv(64)  # "HTTP/1.1 200 OK\r\n..."
        return int(head.split(b" ", 2)[1])
    return 0
