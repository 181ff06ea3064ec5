"""The OpenAI-compatible API under abuse, on a real server with a real language model: every malformed, oversized,
out-of-range or unsupported request gets the right 4xx in OpenAI's error shape (``param`` naming the field where
there is one), a huge ``max_tokens`` is clamped rather than refused, and nothing is ever a 500."""

from __future__ import annotations

import gzip
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maas.registry import Registry
from maas.serving.api.openai.protocol import MAX_MESSAGES
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer

MAX_REQUEST_BYTES = 256 * 1024
CHAT = {"model": "smollm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": "smollm", "prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm_gguf: Path, seed_smollm: Callable[[Path], None]
) -> Iterator[RemoteServer]:
    home = tmp_path_factory.mktemp("openai-abuse-home")
    seed_smollm(home)  # the converted model: no second 30 s conversion
    registry = Registry(home=home)
    registry.register(smollm_gguf, "smollm")
    registry.register(make_linear_model(tmp_path_factory.mktemp("m") / "linear.onnx"), "linear")
    env = {"MAAS_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES), "MAAS_LOAD_WAIT_S": "180"}
    with RemoteServer(home, env=env, ready_timeout_s=300) as server:
        yield server
        assert server.alive(), f"the server died:\n{server.log()}"


@pytest.fixture
def http(server: RemoteServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response's OpenAI error after checking its status, shape and (when given) ``param``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


BAD_BODIES = [
    (b"{", "not valid JSON"),
    (b'{"model": "smollm", "messages": [}', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[" * 10_000 + b"]" * 10_000, "not valid JSON"),
    (b'"just a string"', "JSON object"),
    (b"null", "JSON object"),
    (b"", "not valid JSON"),
]


@pytest.mark.parametrize(("body", "words"), BAD_BODIES)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_malformed_json_is_a_400(http: httpx.Client, path: str, body: bytes, words: str) -> None:
    error = openai_error(http.post(path, content=body, headers={"content-type": "application/json"}), 400)
    assert words in error["message"]


CHAT_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"n": 10**9}, "n"),
    ({"n": -1}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -(2**70)}, "max_completion_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 1e308}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": -9}, "presence_penalty"),
    ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    ({"seed": "42"}, "seed"),
    ({"stream": 1}, "stream"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 5000}, "stop"),
    ({"stop": [None]}, "stop"),
    ({"tools": []}, "tools"),
    ({"tool_choice": "none"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"logit_bias": {"1": 100}}, "logit_bias"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"__proto__": {}}, "__proto__"),
    ({"unknown": None}, "unknown"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": {"text": "Hi"}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, "messages"),
    ({"model": "m" * 10_000}, "model"),
    ({"model": ["smollm"]}, "model"),
]


@pytest.mark.parametrize(("change", "param"), CHAT_REFUSALS, ids=[p for _, p in CHAT_REFUSALS])
def test_chat_parameters_out_of_bounds_are_400s_naming_them(
    http: httpx.Client, change: dict[str, Any], param: str
) -> None:
    openai_error(http.post("/v1/chat/completions", json=CHAT | change), 400, param)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"prompt": [[1, 2], [3]]}, "prompt"),
        ({"prompt": [1, -5]}, "prompt"),
        ({"prompt": [2**40]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ],
)
def test_completion_parameters_out_of_bounds_are_400s(http: httpx.Client, change: dict[str, Any], param: str) -> None:
    openai_error(http.post("/v1/completions", json=COMPLETION | change), 400, param)


def test_non_finite_numbers_are_refused(http: httpx.Client) -> None:
    body = b'{"model": "smollm", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert "finite" in openai_error(response, 400, "temperature")["message"]
    response = http.post(
        "/v1/chat/completions", content=body.replace(b"NaN", b"1e999"), headers={"content-type": "application/json"}
    )
    openai_error(response, 400, "temperature")


def test_a_huge_max_tokens_is_clamped_not_refused(http: httpx.Client) -> None:
    body = COMPLETION | {"max_tokens": 10**30, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
    assert first.startswith("data: ") and orjson.loads(first.removeprefix("data: "))["object"] == "text_completion"
    answer = http.post("/v1/chat/completions", json=CHAT | {"max_tokens": 2**62, "max_completion_tokens": 1})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 1


def test_the_largest_n_is_served(http: httpx.Client) -> None:
    answer = http.post("/v1/chat/completions", json=CHAT | {"n": 16, "max_tokens": 1})
    assert answer.status_code == 200 and [c["index"] for c in answer.json()["choices"]] == list(range(16))


def test_a_prompt_over_the_context_says_both_sizes(http: httpx.Client) -> None:
    error = openai_error(http.post("/v1/completions", json=COMPLETION | {"prompt": "hello " * 9000}), 400, "prompt")
    assert error["code"] == "context_length_exceeded" and "8,192 tokens" in error["message"]
    long_chat = CHAT | {"messages": [{"role": "user", "content": "hello " * 4500}] * 2}
    error = openai_error(http.post("/v1/chat/completions", json=long_chat), 400, "messages")
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("model", ["nope", "nope@production", "smollm/99", "smollm@nope", "../../etc/passwd", "a b"])
def test_unknown_models_are_404_model_not_found(http: httpx.Client, model: str) -> None:
    for path, body in [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", COMPLETION),
        ("/v1/embeddings", {"input": "x"}),
    ]:
        error = openai_error(http.post(path, json=body | {"model": model}), 404, "model")
        assert error["code"] == "model_not_found"
    if ".." not in model:  # the client would normalise the URL's path
        openai_error(http.get(f"/v1/models/{model}"), 404, "model")


def test_models_of_another_kind_are_refused_with_where_they_are_served(http: httpx.Client) -> None:
    error = openai_error(http.post("/v1/chat/completions", json=CHAT | {"model": "linear"}), 400, "model")
    assert "/v2/models/linear/infer" in error["message"]
    error = openai_error(http.post("/v1/embeddings", json={"model": "smollm", "input": "x"}), 400, "model")
    assert "/v1/chat/completions" in error["message"]
    openai_error(http.post("/v1/embeddings", json={"model": "smollm", "input": [[1, 2]]}), 400, "input")
    openai_error(http.post("/v1/embeddings", json={"model": "smollm", "input": ["x"] * 3000}), 400, "input")


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"content-type": "text/plain"}, orjson.dumps(CHAT)),
        ({"content-type": "application/x-www-form-urlencoded"}, b"model=smollm"),
        ({"content-type": "multipart/form-data; boundary=x"}, b"--x--"),
        ({"content-type": "application/json", "content-encoding": "gzip"}, gzip.compress(orjson.dumps(CHAT))),
    ],
)
def test_wrong_content_types_are_415(http: httpx.Client, headers: dict[str, str], body: bytes) -> None:
    openai_error(http.post("/v1/chat/completions", content=body, headers=headers), 415)


def test_oversized_bodies_are_413_in_openai_shape(http: httpx.Client, server: RemoteServer) -> None:
    big = CHAT | {"messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]}
    error = openai_error(http.post("/v1/chat/completions", json=big), 413)
    assert "MAAS_MAX_REQUEST_BYTES" in error["message"] and error["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        yield b'{"model": "smollm", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_REQUEST_BYTES // 4096 + 2):
            yield b"x" * 4096
        yield b'"}]}'

    response = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    openai_error(response, 413)


def test_unknown_paths_and_methods_are_openai_errors(http: httpx.Client) -> None:
    openai_error(http.post("/v1/responses", json={}), 404)
    openai_error(http.get("/v1/chat/completions"), 405)
    openai_error(http.put("/v1/embeddings", json={}), 405)


def test_a_client_leaving_mid_stream_breaks_nothing(server: RemoteServer, http: httpx.Client) -> None:
    body = orjson.dumps(CHAT | {"stream": True, "max_tokens": 200})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


# -- fuzzing -----------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
KEYS = [*CHAT, "n", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "temperature", "top_p", "seed"]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    path, base = draw(st.sampled_from([("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]))
    body = dict(base)
    for key in draw(st.lists(st.sampled_from([*KEYS, "prompt", "input", "extra"]), max_size=3)):
        body[key] = draw(json_values)
    body["max_tokens"] = draw(st.sampled_from([1, 2, -1, "2"]))  # never the default: the rest of the context
    return path, body


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=mutated())
def test_mutated_requests_never_get_a_500(http: httpx.Client, request: tuple[str, dict[str, Any]]) -> None:
    path, body = request
    response = http.post(path, json=body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        openai_error(response, response.status_code)
    elif body.get("stream") is True:
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.json()["object"] in ("chat.completion", "text_completion")
