"""The real server against the unmodified tritonclient and plain HTTP."""

from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from maas.registry import Registry
from maas.testing.server import RemoteServer
from tests.integration.conftest import multi_io_inputs

DTYPES = {"x": "FP32", "ids": "INT64", "mask": "BOOL"}


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("batch", [1, 2, 7, 33, 64])
def test_tritonclient_equals_onnxruntime(
    served: tuple[RemoteServer, Registry, dict[str, Path]], batch: int, binary: bool
) -> None:
    server, _, files = served
    feeds = multi_io_inputs(batch)
    expected = dict(
        zip(["y", "ids_out", "mask_out"], ort.InferenceSession(str(files["multi"])).run(None, feeds), strict=True)
    )
    client = httpclient.InferenceServerClient(server.address)
    inputs = []
    for name, arr in feeds.items():
        inp = httpclient.InferInput(name, list(arr.shape), DTYPES[name])
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in expected]
    result = client.infer("multi", inputs, outputs=outputs, request_id=f"req-{batch}")
    resp = result.get_response()
    assert resp["model_name"] == "multi" and resp["model_version"] == "1" and resp["id"] == f"req-{batch}"
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_requested_outputs_only(served: tuple[RemoteServer, Registry, dict[str, Path]]) -> None:
    server, _, _ = served
    feeds = multi_io_inputs(3)
    body = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": DTYPES[n], "data": a.tolist()} for n, a in feeds.items()
        ],
        "outputs": [{"name": "mask_out"}],
    }
    r = httpx.post(f"{server.url}/v2/models/multi/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]
    assert [o["name"] for o in out] == ["mask_out"]
    assert out[0]["data"] == (~feeds["mask"]).ravel().tolist() and out[0]["datatype"] == "BOOL"
    assert "id" not in r.json()


def test_health_metadata_and_readiness(served: tuple[RemoteServer, Registry, dict[str, Path]]) -> None:
    server, _, _ = served
    client = httpclient.InferenceServerClient(server.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("multi") and client.is_model_ready("linear", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("multi")
    assert meta["name"] == "multi" and meta["versions"] == ["1"] and meta["platform"] == "onnx"
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
        {"name": "mask", "datatype": "BOOL", "shape": [-1, 3]},
    ]
    assert httpx.get(f"{server.url}/v2").json()["extensions"] == ["binary_tensor_data"]
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("nope")


def _post(server: RemoteServer, path: str, **kw: object) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=30, **kw)  # type: ignore[arg-type]


def _good_input(**over: object) -> dict[str, object]:
    d: dict[str, object] = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    d.update(over)
    return d


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v2/models/linear/infer", b"{not json", 400, "JSON"),
        ("/v2/models/linear/infer", b"[1, 2]", 400, "object"),
        ("/v2/models/linear/infer", {"inputs": [_good_input(name="pixels")]}, 400, "pixels"),
        ("/v2/models/linear/infer", {"inputs": [_good_input(datatype="INT64")]}, 400, "FP32"),
        ("/v2/models/linear/infer", {"inputs": [_good_input(datatype="FLOAT99")]}, 400, "datatype"),
        ("/v2/models/linear/infer", {"inputs": [_good_input(data=[1, 2, 3])]}, 400, "3"),
        ("/v2/models/linear/infer", {"inputs": [_good_input(shape=[1, 5], data=[1] * 5)]}, 400, "[-1, 4]"),
        ("/v2/models/linear/infer", {"inputs": [_good_input(shape=[4], data=[1] * 4)]}, 400, "shape"),
        ("/v2/models/linear/infer", {"inputs": [_good_input(data=["a", "b", "c", "d"])]}, 400, "FP32"),
        ("/v2/models/linear/infer", {"inputs": []}, 400, "x"),
        ("/v2/models/linear/infer", {"inputs": [_good_input()], "outputs": [{"name": "zz"}]}, 400, "zz"),
        ("/v2/models/nope/infer", {"inputs": [_good_input()]}, 404, "nope"),
        ("/v2/models/linear/versions/9/infer", {"inputs": [_good_input()]}, 404, "9"),
        ("/v2/models/linear/versions/abc/infer", {"inputs": [_good_input()]}, 400, "version"),
        ("/v2/models/bad..name/infer", {"inputs": [_good_input()]}, 400, "name"),
    ],
)
def test_bad_requests_get_their_status_and_an_error(
    served: tuple[RemoteServer, Registry, dict[str, Path]], path: str, body: object, status: int, words: str
) -> None:
    server, _, _ = served
    r = _post(server, path, content=body) if isinstance(body, bytes) else _post(server, path, json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


def test_body_over_the_limit_gets_413(served: tuple[RemoteServer, Registry, dict[str, Path]]) -> None:
    server, _, _ = served
    big = b'{"inputs": [' + b" " * (2 * 1024 * 1024) + b"]}"
    r = _post(server, "/v2/models/linear/infer", content=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(40):
            yield b" " * 65536

    r = _post(server, "/v2/models/linear/infer", content=chunks())
    assert r.status_code == 413
    assert server.alive()


def test_unknown_route_is_json_404(served: tuple[RemoteServer, Registry, dict[str, Path]]) -> None:
    server, _, _ = served
    r = httpx.get(f"{server.url}/v2/nothing/here")
    assert r.status_code == 404 and "error" in r.json()


def test_metrics_count_requests_by_model_version_and_outcome(
    served: tuple[RemoteServer, Registry, dict[str, Path]],
) -> None:
    server, _, _ = served
    _post(server, "/v2/models/linear/infer", json={"inputs": [_good_input()]})
    _post(server, "/v2/models/linear/infer", json={"inputs": [_good_input(data=[1])]})
    text = httpx.get(f"{server.url}/metrics").text
    assert 'maas_inference_requests_total{model="linear",outcome="success",version="1"}' in text
    assert 'maas_inference_requests_total{model="linear",outcome="client_error",version="1"}' in text
    assert 'maas_inference_request_duration_seconds_bucket{le="0.005",model="linear",version="1"}' in text
    assert 'maas_model_load_seconds{model="linear",version="1"}' in text
    assert "maas_loaded_models 3.0" in text


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "words"),
    [
        ("/v2/models/linear/infer", {"Inference-Header-Content-Length": "²".encode()}, b"{}", 400, "byte count"),
        ("/v2/models/linear/infer", {"Inference-Header-Content-Length": "9" * 5000}, b"{}", 400, "byte count"),
        ("/v2/models/linear/infer", {"Inference-Header-Content-Length": "999"}, b"{}", 400, "999"),
        ("/v2/models/linear/versions/²/infer", {}, b"{}", 400, "version"),
        ("/v2/models/linear/versions/99999999999999999999/infer", {}, b"{}", 400, "version"),
        ("/v2/models/linear/infer", {}, b'{"inputs": [{"data": [' + b"9" * 5000 + b"]}]}", 400, "JSON"),
        ("/v2/models/linear/infer", {"Content-Encoding": "br"}, b"{}", 415, "Content-Encoding"),
        ("/v2/models/linear/infer", {"Content-Encoding": "gzip"}, b"not gzip", 400, "gzip"),
    ],
)
def test_hostile_requests_get_4xx_not_500(
    served: tuple[RemoteServer, Registry, dict[str, Path]],
    path: str,
    headers: dict[str, str | bytes],
    body: bytes,
    status: int,
    words: str,
) -> None:
    server, _, _ = served
    r = _post(server, path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert server.alive()


def test_empty_outputs_list_means_all_outputs(served: tuple[RemoteServer, Registry, dict[str, Path]]) -> None:
    server, _, _ = served
    r = _post(server, "/v2/models/linear/infer", json={"inputs": [_good_input()], "outputs": []})
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["y"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_request_compression(
    served: tuple[RemoteServer, Registry, dict[str, Path]], algorithm: str
) -> None:
    server, _, files = served
    x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    want = ort.InferenceSession(str(files["linear"])).run(None, {"x": x})[0]
    client = httpclient.InferenceServerClient(server.address)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("linear", [inp], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("y"), want)


def test_gzip_bomb_is_413(served: tuple[RemoteServer, Registry, dict[str, Path]]) -> None:
    import gzip

    server, _, _ = served
    bomb = gzip.compress(b" " * (8 * 1024 * 1024))  # 8 MiB inflated; the test server's limit is 1 MiB
    r = _post(server, "/v2/models/linear/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "inflates" in r.json()["error"]


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors_round_trip(served: tuple[RemoteServer, Registry, dict[str, Path]], binary: bool) -> None:
    server, _, _ = served
    texts = np.array(["hello", "wörld", "", "a longer sentence with spaces"], dtype=object)
    client = httpclient.InferenceServerClient(server.address)
    inp = httpclient.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(texts, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("echo", "batch")]
    result = client.infer("text", [inp], outputs=outputs)
    assert [b.decode() if isinstance(b, bytes) else b for b in result.as_numpy("echo").tolist()] == texts.tolist()
    assert result.as_numpy("batch").tolist() == [4]
