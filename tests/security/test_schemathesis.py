"""The real server fuzzed through its own OpenAPI (schemathesis) and through raw inference bodies (hypothesis).

Every generated request must get an answer below 500, error answers are JSON with an ``error`` string, and
the server stays live throughout. Both fuzzers run with fixed seeds, so a failure reproduces.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maas.registry import Registry
from maas.tensors import Signature, TensorSpec
from maas.testing.models import make_linear_model, make_multi_io_model, make_text_model
from maas.testing.server import RemoteServer
from tests.security.test_fuzz_decoders import IDS, MASK, TEXT, X
from tests.security.test_fuzz_decoders import requests as oip_requests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The served models and their signatures (as maas.testing.models builds them).
MODELS: dict[str, Signature] = {
    "multi": Signature(
        inputs=(X, IDS, MASK),
        outputs=(
            TensorSpec("y", "FP32", (-1, 4)),
            TensorSpec("ids_out", "INT64", (-1, 3)),
            TensorSpec("mask_out", "BOOL", (-1, 3)),
        ),
    ),
    "linear": Signature(inputs=(X,), outputs=(TensorSpec("y", "FP32", (-1, 2)),)),
    "text": Signature(inputs=(TEXT,), outputs=(TensorSpec("echo", "BYTES", (-1,)), TensorSpec("batch", "INT64", (1,)))),
}
MAX_REQUEST_BYTES = 1024 * 1024

# schemathesis: path names come from the registry half of the time, so requests reach the models.
SCHEMATHESIS_CONFIG = f"""
[dictionaries.models]
values = {json.dumps(sorted(MODELS))}

[dictionaries.versions]
values = ["1", "2", "0"]

[parameters]
"path.name" = {{ dictionary = "models", probability = 0.5 }}
"path.version" = {{ dictionary = "versions", probability = 0.5 }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    """A server over `multi` (FP32, INT64 and BOOL inputs), `linear` (FP32) and `text` (BYTES)."""
    home = tmp_path_factory.mktemp("security-home")
    models = tmp_path_factory.mktemp("models")
    reg = Registry(home=home)
    reg.register(make_multi_io_model(models / "multi.onnx"), "multi", alias="production")
    reg.register(make_linear_model(models / "linear.onnx"), "linear")
    reg.register(make_text_model(models / "text.onnx"), "text")
    with RemoteServer(home, env={"MAAS_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}) as server:
        yield server
        assert server.alive(), f"the server died:\n{server.log()}"


def test_openapi_operations_never_answer_5xx(server: RemoteServer, tmp_path: Path) -> None:
    """schemathesis (coverage, fuzzing and stateful phases) over every operation in /openapi.json: no 5xx."""
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    operations = {f"{method.upper()} {path}" for path, methods in spec["paths"].items() for method in methods}
    assert operations, "the server's OpenAPI lists no operations"

    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    junit = tmp_path / "junit.xml"
    cmd = [
        *(sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(config), "run"),
        server.url + "/openapi.json",
        *("--checks", "not_a_server_error"),
        *("--phases", "examples,coverage,fuzzing,stateful"),
        *("--max-examples", "100", "--seed", "20240601", "--workers", "1", "--request-timeout", "30"),
        *("--report", "junit", "--report-junit-path", str(junit), "--report-dir", str(tmp_path)),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    output = run.stdout + run.stderr

    tested = {case.get("name", "") for case in ET.parse(junit).getroot().iter("testcase")}
    assert operations <= tested, f"schemathesis did not test {sorted(operations - tested)}:\n{output}"
    assert run.returncode == 0, f"schemathesis found server errors (reproducers below):\n{output}\n{server.log()}"
    assert server.alive()


# -- raw inference bodies ----------------------------------------------------------------------------------------------

# Printable ASCII without surrounding spaces: what an HTTP client can put in a header value.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24).map(str.strip)


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[str, dict[str, str], bytes]:
    """A path to an infer route and the headers and body to POST there: realistic, corrupted or random."""
    name = draw(st.sampled_from([*MODELS, "missing"]))
    version = draw(st.sampled_from([None, None, None, "1", "2", "x"]))
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    headers: dict[str, str] = {}

    header_length: int | None = None
    kind = draw(st.sampled_from(["valid", "valid", "request", "request", "bytes", "json"]))
    if kind in ("valid", "request"):
        built = draw(oip_requests(MODELS.get(name, MODELS["multi"]), valid=kind == "valid"))
        body, header_length = built.body, built.header_length
    elif kind == "bytes":
        body = draw(st.binary(max_size=2048))
    else:
        body = draw(st.sampled_from([b"{}", b"[]", b"null", b'{"inputs": []}', b'{"inputs": [{}]}', b"NaN", b""]))

    how = draw(st.sampled_from(["exact", "exact", "exact", "none", "junk"]))
    if how == "exact" and header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    elif how == "junk":
        headers["Inference-Header-Content-Length"] = draw(
            st.sampled_from(["-1", "1e3", "+7", "9" * 19, "9" * 18, "0x10", ""])
            | st.integers(-5, len(body) + 5).map(str)
            | header_text
        )

    encoding = draw(
        st.sampled_from([None, None, None, None, "identity", "gzip", "deflate", "GZip", "br", "gzip, deflate"])
    )
    if encoding is not None:
        headers["Content-Encoding"] = encoding
        packing = draw(st.sampled_from(["compress", "compress", "compress", "garbage", "bomb", "plain"]))
        if packing == "compress" and encoding.strip().lower() == "gzip":
            body = gzip.compress(body)
        elif packing == "compress" and encoding == "deflate":
            body = zlib.compress(body)
        elif packing == "garbage":
            body = draw(st.binary(max_size=64))
        elif packing == "bomb":
            body = (gzip.compress if "gzip" in encoding.lower() else zlib.compress)(b"\0" * (4 * MAX_REQUEST_BYTES))

    content_type = draw(
        st.sampled_from(
            [None, None, "application/json", "application/octet-stream", "text/plain", "multipart/form-data"]
        )
        | header_text
    )
    if content_type is not None:
        headers["Content-Type"] = content_type
    return path, headers, body


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=infer_requests())
def test_infer_routes_answer_random_bodies_below_500(
    server: RemoteServer, request: tuple[str, dict[str, str], bytes]
) -> None:
    """POSTs of realistic, corrupted and random bodies, headers and encodings: below 500, errors as JSON."""
    path, headers, body = request
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post(path, content=body, headers=headers)
    assert response.status_code < 500, f"{response.status_code} {response.text[:2000]}\n{server.log()[-4000:]}"
    if response.status_code >= 400:
        error = response.json().get("error")
        assert isinstance(error, str) and error, response.text
    else:
        assert response.status_code == 200, response.text
        length = response.headers.get("Inference-Header-Content-Length")
        header = json.loads(response.content[: int(length)] if length is not None else response.content)
        model = MODELS[path.split("/")[3]]
        assert {t["name"] for t in header["outputs"]} <= {s.name for s in model.outputs}, header


def test_server_is_live_after_fuzzing(server: RemoteServer) -> None:
    """After every fuzzer above, the server is still up and answers its liveness probe."""
    response = httpx.get(server.url + "/v2/health/live", timeout=10)
    assert response.status_code == 200 and response.json() == {"live": True}
    assert server.alive()
