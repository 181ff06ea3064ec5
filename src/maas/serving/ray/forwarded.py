"""What travels between the front and a replica: a request read whole by the front, and the parts of its answer;
a gRPC call and its reply.

A replica answers with a :class:`Head` (status, headers and the first body chunk: a whole non-streaming answer is
this one part) and then, while :attr:`Head.more` says so, :class:`Chunk` parts. Plain frozen dataclasses, pickled
by Ray; the replica rebuilds the ASGI scope from the request with :func:`scope_of`.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import Scope

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    raw_path: bytes | None
    query_string: bytes
    headers: Headers
    #: The client's (host, port) as the front saw it: the replica's audit log and auth throttle see the real client.
    client: tuple[str, int] | None
    #: The front's own (host, port): the address the client spoke to.
    server: tuple[str, int | None] | None
    scheme: str
    http_version: str
    body: bytes

    @classmethod
    def of(cls, scope: Scope, body: bytes) -> ForwardedRequest:
        """The request the front received (``scope`` is its ASGI HTTP scope)."""
        client, server = scope.get("client"), scope.get("server")
        return cls(
            method=scope["method"],
            path=scope["path"],
            raw_path=scope.get("raw_path"),
            query_string=scope.get("query_string", b""),
            headers=tuple((bytes(k), bytes(v)) for k, v in scope.get("headers", ())),
            client=(str(client[0]), int(client[1])) if client else None,
            server=(str(server[0]), server[1]) if server else None,
            scheme=scope.get("scheme", "http"),
            http_version=scope.get("http_version", "1.1"),
            body=body,
        )


def scope_of(request: ForwardedRequest) -> Scope:
    """The ASGI HTTP scope a server would have given the app for ``request`` (ASGI spec 2.3, as uvicorn's: apps then
    watch ``receive`` for the client's disconnect)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version,
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path,
        "query_string": request.query_string,
        "root_path": "",
        "headers": list(request.headers),
        "client": request.client,
        "server": request.server,
        "state": {},
    }


@dataclass(frozen=True)
class Head:
    """The answer's status and headers with its first body chunk; ``more``: further :class:`Chunk` parts follow."""

    status: int
    headers: Headers
    body: bytes
    more: bool


@dataclass(frozen=True)
class Chunk:
    body: bytes
    more: bool


#: gRPC metadata as (key, value) pairs; a value is bytes for a ``-bin`` key.
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True)
class GrpcCall:
    """A unary call of ``inference.GRPCInferenceService`` the front received."""

    #: The RPC's name in the service, e.g. ``ModelInfer``.
    method: str
    #: The client's invocation metadata (its ``authorization`` among them).
    metadata: Metadata
    #: The client's address as grpc names it (``ipv4:10.0.0.5:51234``): the replica's auth throttle sees the client.
    peer: str
    #: The serialized request message.
    body: bytes


@dataclass(frozen=True)
class GrpcReply:
    """How the replica ended a :class:`GrpcCall`: a status (``grpc.StatusCode`` name), and the serialized response
    message when it is ``OK``."""

    code: str
    details: str
    trailing: tuple[tuple[str, str], ...]
    body: bytes
