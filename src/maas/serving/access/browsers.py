"""Requests a web page makes on its own, refused by a server that serves without keys on a loopback address.

Without keys every request acts as the local admin, so a page the operator merely visits could register a model,
move an alias or make a key through ``http://127.0.0.1:8000`` (a cross-site request: it carries the page's
``Origin`` or ``Sec-Fetch-Site``), or read the answers by re-pointing its own host name at 127.0.0.1 (DNS
rebinding: the ``Host`` header is then the page's name). Programs (curl, the maas CLI, tritonclient, openai) send
neither header and name the address they connect to, so they are not affected.
"""

from __future__ import annotations

import functools
import socket
from urllib.parse import urlsplit

from starlette.types import Scope

from maas.errors import Forbidden
from maas.serving.access.mode import is_loopback

_FOREIGN_FETCH = frozenset({"cross-site", "same-site"})


def check_local(scope: Scope) -> None:
    """Refuse (:class:`Forbidden`) a request to a keyless loopback server that a browser page sent or that names
    another host."""
    host = origin = fetch_site = None
    for key, value in scope.get("headers", []):
        if key == b"host":
            host = bytes(value).decode("latin-1")
        elif key == b"origin":
            origin = bytes(value).decode("latin-1")
        elif key == b"sec-fetch-site":
            fetch_site = bytes(value).decode("latin-1").strip().lower()
    if host is not None and not _local_name(_hostname(host)):
        raise Forbidden(
            f"this server serves without API keys on a loopback address and answers only requests for localhost or "
            f"127.0.0.1, not {host[:100]!r}; serve with --auth required to be reached under another name"
        )
    if fetch_site in _FOREIGN_FETCH or (origin is not None and not _local_name(_hostname(urlsplit(origin).netloc))):
        raise Forbidden(
            "a web page may not call a server that serves without API keys (cross-site request refused); "
            "serve with --auth required and give the page's backend a key"
        )


@functools.cache
def _own_names() -> frozenset[str]:
    """This machine's own names (Debian maps the hostname to 127.0.1.1): a browser on it may use them."""
    return frozenset(n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n)


def _local_name(host: str) -> bool:
    host = host.lower().rstrip(".")
    return is_loopback(host) or host.endswith(".localhost") or host in _own_names()


def _hostname(netloc: str) -> str:
    """``host`` of ``host:port`` or ``[v6]:port``."""
    netloc = netloc.strip().rpartition("@")[2]
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc
