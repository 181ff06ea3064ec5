"""The front of ``maas serve --engine ray`` and its replica side, without Ray running: which requests are retried
when a replica dies, the scope a replica rebuilds, an app's answer as parts, and the front's own answers (body
limits, retries, a replica dying mid-answer) against a fake deployment handle. The real thing, with Ray Serve and
replicas killed under load, is tests/integration/test_ray_serve.py."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from maas.errors import Forbidden, Unauthorized
from maas.serving.ray.doorman import Doorman
from maas.serving.ray.forwarded import Chunk, ForwardedRequest, Head, scope_of
from maas.serving.ray.front import Front
from maas.serving.ray.inprocess import IncompleteResponse, answer
from maas.serving.ray.retry import Retries, replica_crashed, replica_died, retry_safe
from maas.serving.settings import ServerSettings

ray_errors = pytest.importorskip("ray.exceptions", reason="Ray Serve not installed: pip install 'maas[ray]'")
with warnings.catch_warnings():  # Ray Serve's own pydantic models warn on import; not ours
    warnings.simplefilter("ignore")
    from ray.serve import exceptions as serve_errors

INFER = "/v2/models/linear/infer"


@pytest.mark.parametrize(
    ("method", "path", "safe"),
    [
        ("GET", "/v2/health/ready", True),
        ("HEAD", "/metrics", True),
        ("OPTIONS", "/v1/chat/completions", True),
        ("GET", "/admin/v1/models", True),
        ("POST", INFER, True),
        ("POST", "/v2/models/linear/versions/2/infer", True),
        ("post", "/v1/chat/completions", True),
        ("POST", "/v1/completions", True),
        ("POST", "/v1/embeddings", True),
        ("POST", "/admin/v1/models", False),
        ("PUT", "/admin/v1/models/linear/aliases/production", False),
        ("PATCH", "/admin/v1/keys/k1", False),
        ("DELETE", "/admin/v1/models/linear/aliases/production", False),
        ("POST", "/v2/models/linear/infer/extra", False),
        ("POST", "/v2/models/a/b/infer", False),
        ("PUT", INFER, False),
    ],
)
def test_only_reads_and_inference_are_repeated(method: str, path: str, safe: bool) -> None:
    assert retry_safe(method, path) is safe


def test_a_dead_replica_is_told_from_a_failed_request() -> None:
    died = ray_errors.ActorDiedError()
    assert replica_died(died)
    assert replica_died(ray_errors.ActorUnavailableError("unreachable", None))
    assert replica_died(ray_errors.RayTaskError("forward", "traceback", died))
    assert replica_died(ray_errors.RayTaskError("forward", "traceback", died).as_instanceof_cause())
    assert replica_died(serve_errors.ReplicaUnavailableError("r1"))
    assert not replica_died(ray_errors.RayTaskError("forward", "traceback", ValueError("bad input")))
    assert not replica_died(ValueError("bad input"))


def test_retries_are_bounded_in_number_and_time() -> None:
    retries = Retries(attempts=3, first_s=0.1, most_s=0.15)
    assert [retries.next_wait(), retries.next_wait(), retries.next_wait()] == [0.1, 0.15, None]
    assert retries.made == 3
    late = Retries(total_s=1.0, first_s=0.5)
    late.started -= 0.6
    assert late.next_wait() is None


def test_the_replica_sees_the_request_the_front_received() -> None:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/a b/infer",
        "raw_path": b"/v2/models/a%20b/infer",
        "query_string": b"x=1",
        "headers": [(b"content-type", b"application/json"), (b"x-forwarded-for", b"10.0.0.9")],
        "client": ("10.1.2.3", 5555),
        "server": ("127.0.0.1", 8000),
        "scheme": "https",
        "http_version": "1.1",
    }
    rebuilt = scope_of(ForwardedRequest.of(scope, b"{}"))
    assert {k: rebuilt[k] for k in scope} == scope
    assert rebuilt["root_path"] == "" and rebuilt["asgi"]["spec_version"] == "2.3"
    assert Request(rebuilt).client == ("10.1.2.3", 5555)  # the audit log and the auth throttle see the client


# The replica side: an app's answer as parts.


def _app(seen: list[str]) -> Starlette:
    async def plain(request: Request) -> JSONResponse:
        return JSONResponse({"got": json.loads(await request.body())})

    async def stream(request: Request) -> StreamingResponse:
        async def tokens() -> AsyncIterator[bytes]:
            try:
                for i in range(500):
                    yield f"data: {i}\n\n".encode()
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:  # Starlette's response stops the stream once receive says disconnect
                seen.append("cancelled")
                raise
            seen.append("finished")

        return StreamingResponse(tokens(), media_type="text/event-stream")

    return Starlette(routes=[Route("/plain", plain, methods=["POST"]), Route("/stream", stream)])


def _request(method: str, path: str, body: bytes = b"") -> ForwardedRequest:
    headers = ((b"content-length", str(len(body)).encode()),)
    return ForwardedRequest(method, path, None, b"", headers, ("10.1.2.3", 5555), ("h", 80), "http", "1.1", body)


def test_a_whole_answer_is_one_part() -> None:
    async def run() -> list[Head | Chunk]:
        return [part async for part in answer(_app([]), _request("POST", "/plain", b'{"a": 1}'))]

    (head,) = asyncio.run(run())
    assert isinstance(head, Head) and head.status == 200 and not head.more
    assert json.loads(head.body) == {"got": {"a": 1}}


def test_a_stream_comes_part_by_part_and_stops_when_the_caller_leaves() -> None:
    seen: list[str] = []

    async def run() -> list[Head | Chunk]:
        parts: list[Head | Chunk] = []
        gen = answer(_app(seen), _request("GET", "/stream"), grace_s=30.0)  # past the stream's own 5 s
        async for part in gen:
            parts.append(part)
            if len(parts) == 3:
                break
        await gen.aclose()  # what Ray does when the front cancels the call
        return parts

    head, *chunks = asyncio.run(run())
    assert isinstance(head, Head) and head.more and head.body.startswith(b"data: 0")
    assert all(isinstance(c, Chunk) and c.more for c in chunks)
    assert seen == ["cancelled"]  # the app noticed the disconnect and ended its stream


def test_an_app_that_never_answers_gives_a_json_500_and_one_that_stops_midway_an_error() -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        return

    async def halfway(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})

    async def run(app: Any) -> list[Head | Chunk]:
        return [part async for part in answer(app, _request("GET", "/"))]

    (head,) = asyncio.run(run(silent))
    assert isinstance(head, Head) and head.status == 500 and b"error" in head.body
    with pytest.raises(IncompleteResponse):
        asyncio.run(run(halfway))


# The front, against a fake deployment handle.


class FakeCall:
    """One ``forward`` call: its parts in order; an exception in the list is raised when reached, and ``...`` waits
    for ever (a replica still working)."""

    def __init__(self, parts: list[Any]) -> None:
        self._parts = list(parts)
        self.cancelled = False

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)
        if not self._parts:
            raise StopAsyncIteration
        if self._parts[0] is Ellipsis:
            await asyncio.Event().wait()
        part = self._parts.pop(0)
        if isinstance(part, BaseException):
            raise part
        return part

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    def __init__(self, *calls: list[Any]) -> None:
        self._calls = list(calls)
        self.requests: list[ForwardedRequest] = []
        self.calls: list[FakeCall] = []
        self.forward = self

    def options(self, **_: Any) -> FakeHandle:
        return self

    def remote(self, request: ForwardedRequest) -> FakeCall:
        self.requests.append(request)
        self.calls.append(FakeCall(self._calls.pop(0)))
        return self.calls[-1]


OK = Head(200, ((b"content-type", b"application/json"),), b'{"ok": true}', more=False)


def _front(handle: FakeHandle, **settings: Any) -> Front:
    return Front(handle, ServerSettings(**settings), retries=lambda: Retries(first_s=0.001))


def _call(
    front: Front, method: str, path: str, body: list[bytes], length: int | None = None, *, leave: bool = False
) -> list[Message]:
    """The messages the front sends for a request whose body arrives in ``body``'s pieces; ``leave``: the client
    disconnects once it has sent the body."""
    size = sum(map(len, body)) if length is None else length
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-length", str(size).encode())] if size >= 0 else [],
        "client": ("10.1.2.3", 5555),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
        "http_version": "1.1",
    }
    sent: list[Message] = []

    async def run() -> None:
        pieces = list(body) or [b""]  # a request without a body still gets one (empty) message
        done = asyncio.Event()

        async def receive() -> Message:
            if pieces:
                return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}
            if not leave:
                await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)
            if not message.get("more_body", False) and message["type"] == "http.response.body":
                done.set()

        await front(scope, receive, send)

    asyncio.run(run())
    return sent


def _status(sent: list[Message]) -> int:
    return int(sent[0]["status"])


def _error(sent: list[Message]) -> str:
    return str(json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"])


def test_an_inference_whose_replica_died_is_sent_again_with_the_client_address() -> None:
    handle = FakeHandle([ray_errors.ActorDiedError()], [OK])
    sent = _call(_front(handle), "POST", INFER, [b'{"inputs"', b": []}"])
    assert _status(sent) == 200 and sent[1]["body"] == b'{"ok": true}'
    assert len(handle.requests) == 2 and handle.requests[1].body == b'{"inputs": []}'
    assert handle.requests[1].client == ("10.1.2.3", 5555)


def test_an_admin_change_whose_replica_died_is_not_sent_again() -> None:
    handle = FakeHandle([ray_errors.RayTaskError("forward", "tb", ray_errors.ActorDiedError())], [OK])
    sent = _call(_front(handle), "POST", "/admin/v1/models", [b"{}"])
    assert _status(sent) == 502 and "may or may not have taken effect" in _error(sent)
    assert len(handle.requests) == 1


def test_retries_stop_after_the_last_attempt() -> None:
    handle = FakeHandle(*[[ray_errors.ActorUnavailableError("unreachable", None)]] * 4)
    sent = _call(_front(handle), "GET", "/v2/health/ready", [])
    assert _status(sent) == 503 and "4 attempts" in _error(sent)


def test_a_failure_in_the_replica_call_is_a_json_502() -> None:
    handle = FakeHandle([ray_errors.RayTaskError("forward", "tb", RuntimeError("boom"))])
    sent = _call(_front(handle), "POST", INFER, [b"{}"])
    assert _status(sent) == 502 and "RayTaskError" in _error(sent)


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_limit_is_answered_413_by_the_front(declared: bool) -> None:
    handle = FakeHandle()
    sent = _call(_front(handle, max_request_bytes=10), "POST", INFER, [b"x" * 6, b"x" * 6], None if declared else -1)
    assert _status(sent) == 413 and "MAAS_MAX_REQUEST_BYTES" in _error(sent)
    assert (b"connection", b"close") in sent[0]["headers"]
    assert handle.requests == []


def test_a_replica_dying_mid_answer_cuts_the_answer_off() -> None:
    call = [Head(200, (), b"data: 0\n\n", more=True), Chunk(b"data: 1\n\n", more=True), ray_errors.ActorDiedError()]
    handle = FakeHandle(call)
    sent = _call(_front(handle), "POST", "/v1/chat/completions", [b"{}"])
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n"]
    assert sent[-1]["more_body"] is True  # never completed: uvicorn closes the connection
    assert len(handle.requests) == 1  # not retried once the answer has started


def test_a_client_leaving_before_its_answer_cancels_the_call() -> None:
    handle = FakeHandle([...])
    sent = _call(_front(handle), "POST", "/v1/chat/completions", [b"{}"], leave=True)
    assert sent == [] and handle.calls[0].cancelled


def test_a_request_whose_replica_died_running_it_is_sent_again_once() -> None:
    crashes = Retries(first_s=0.001)
    assert crashes.next_wait(crashed=True) is not None  # the replica may have been killed from outside
    assert crashes.next_wait(crashed=True) is None  # twice: the request itself may be what kills them
    unreachable = Retries(first_s=0.001)
    assert [unreachable.next_wait() is not None for _ in range(4)] == [True, True, True, False]
    assert replica_crashed(ray_errors.ActorDiedError())
    assert not replica_crashed(ray_errors.ActorUnavailableError("unreachable", None))


class Keys:
    """An authenticator that knows one key."""

    def __init__(self) -> None:
        self.asked: list[tuple[str | None, str]] = []

    async def authenticate(self, authorization: str | None, client: str) -> object:
        self.asked.append((authorization, client))
        if authorization != "Bearer good":
            raise Unauthorized("this server requires an API key")
        return object()


def test_the_front_refuses_a_stranger_before_reading_the_body() -> None:
    keys = Keys()
    settings = ServerSettings(host="0.0.0.0", auth="required")
    front = Front(FakeHandle([OK]), settings, doorman=Doorman(settings, authenticator=keys))  # type: ignore[arg-type]
    received: list[str] = []
    sent: list[Message] = []
    bodies = [b"{}"]

    async def receive() -> Message:
        if not bodies:
            await asyncio.Event().wait()  # the client stays
        received.append("body")
        return {"type": "http.request", "body": bodies.pop(), "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": INFER,
        "raw_path": INFER.encode(),
        "query_string": b"",
        "headers": [(b"content-length", b"2")],
        "client": ("10.1.2.3", 5555),
        "server": ("0.0.0.0", 8000),
        "scheme": "http",
        "http_version": "1.1",
    }
    asyncio.run(front(scope, receive, send))
    assert sent[0]["status"] == 401 and received == [] and keys.asked == [(None, "10.1.2.3")]
    sent.clear()
    asyncio.run(front({**scope, "path": "/v2/health/live"}, receive, send))  # probes stay open
    assert sent[0]["status"] == 200 and received[:1] == ["body"]


def test_a_keyless_loopback_front_refuses_a_foreign_host_before_reading_the_body() -> None:
    doorman = Doorman(ServerSettings())  # 127.0.0.1, keys off: the browser checks
    with pytest.raises(Forbidden):
        asyncio.run(doorman.http({"type": "http", "path": INFER, "headers": [(b"host", b"evil.example")]}))
    asyncio.run(doorman.http({"type": "http", "path": INFER, "headers": [(b"host", b"127.0.0.1:8000")]}))
    asyncio.run(doorman.grpc("ModelInfer", (), "10.1.2.3"))  # gRPC: no key needed when keys are off
