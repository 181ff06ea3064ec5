"""Several "hosts" on one machine: Linux network namespaces joined by veth pairs, for the multihost tier.

A :class:`Network` makes one namespace per host plus a switch namespace holding a bridge; each host has one
interface, ``eth0``, with an address on a private /24, cabled by a veth pair to a port of the bridge. Every link is
made inside the namespaces (``ip -n``), so the root namespace's interfaces and routes are never touched, and every
process a test starts runs inside a host (``ip netns exec``): no connection starts in the root namespace.

Teardown always happens: :meth:`Network.close` kills what runs in the namespaces and deletes them; a watchdog
process does the same when pytest dies without tearing down; and a new network first deletes the namespaces of
earlier test processes that are gone (their names carry the pid that made them).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from maas.testing import processes

PREFIX = "maasmh-"
#: A private /24 no maas machine is likely to use; it only exists inside the namespaces anyway.
SUBNET = "10.213.77"
IFNAME = "eth0"

# Waits for EOF on stdin (pytest exited, however it exited), then kills every process in the namespaces named in
# argv and deletes them.
_WATCHDOG = """
import os, signal, subprocess, sys
sys.stdin.read()
for ns in sys.argv[1:]:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
"""


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the multihost tier as root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (Debian: apt-get install iproute2)"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    with contextlib.suppress(RuntimeError):
        for pid in _ip("netns", "pids", ns).split():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def remove_stale() -> None:
    """Delete the namespaces (and kill what runs in them) left by test processes that no longer exist."""
    for ns in namespaces():
        if not ns.startswith(PREFIX):
            continue
        owner = ns[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and alive(int(owner)):
            continue
        _kill_inside(ns)
        with contextlib.suppress(RuntimeError):
            _ip("netns", "delete", ns)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    address: str

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside this host."""
        return ["ip", "netns", "exec", self.ns, *cmd]

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside this host, in a session of its own (so that its whole group can be killed), killed at
        the latest when the Python process exits."""
        return processes.popen(self.command(cmd), **kwargs)

    def run(self, cmd: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside this host to its end; its output as text (stderr folded into stdout)."""
        proc = self.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            processes.kill_group(proc)
            out, _ = proc.communicate()
            raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s on {self.name}:\n{out}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)

    def python(self, code: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> str:
        """Run ``python -c code args`` inside this host; its output, once it exited 0."""
        done = self.run([sys.executable, "-c", code, *args], timeout=timeout, env=env)
        assert done.returncode == 0, f"on {self.name}: {done.stdout}"
        return done.stdout


class Network:
    """Hosts ``names`` (addresses .1, .2, ... in order) on one switch; use as a context manager."""

    def __init__(self, names: Sequence[str]) -> None:
        remove_stale()
        tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.switch = f"{tag}-sw"
        self.hosts = {name: Host(name, f"{tag}-{name}", f"{SUBNET}.{i}") for i, name in enumerate(names, start=1)}
        self._watchdog: subprocess.Popen[bytes] | None = None
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _all(self) -> list[str]:
        return [self.switch, *(h.ns for h in self.hosts.values())]

    def _create(self) -> None:
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, *self._all()], stdin=subprocess.PIPE, start_new_session=True
        )
        for ns in self._all():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for port, host in enumerate(self.hosts.values()):
            peer = f"p{port}"
            _ip("-n", host.ns, "link", "add", IFNAME, "type", "veth", "peer", "name", peer, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
            _ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", IFNAME)
            _ip("-n", host.ns, "link", "set", IFNAME, "up")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        """Kill every process in the namespaces and delete them."""
        existing = set(namespaces())
        for ns in self._all():
            if ns in existing:
                _kill_inside(ns)
                with contextlib.suppress(RuntimeError):
                    _ip("netns", "delete", ns)
        if self._watchdog is not None:
            with contextlib.suppress(Exception):
                self._watchdog.stdin.close()  # type: ignore[union-attr]
                self._watchdog.wait(timeout=30)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
