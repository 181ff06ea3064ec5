"""A flipped byte in a stored artifact: verify fails, the server refuses that model and serves the others."""

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as httpclient

from maas.registry import Registry
from maas.testing.models import make_linear_model, make_multi_io_model
from maas.testing.server import RemoteServer
from tests.unit.test_registry import flip_byte


def test_corrupted_artifact_is_refused_and_others_keep_serving(
    home: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    reg = Registry()
    bad = reg.register(make_multi_io_model(tmp_path / "a.onnx"), "broken", alias="production")
    reg.register(make_linear_model(tmp_path / "b.onnx"), "healthy")
    flip_byte(reg.artifacts.local_path(bad.artifact_digest))

    verify = subprocess.run(
        [sys.executable, "-m", "maas", "models", "verify"], env=cli_env, capture_output=True, text=True
    )
    assert verify.returncode != 0
    assert "digest mismatch" in verify.stdout and bad.artifact_digest in verify.stdout
    assert "healthy/1" in verify.stdout
    ok = subprocess.run(
        [sys.executable, "-m", "maas", "models", "verify", "healthy"], env=cli_env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr

    with RemoteServer(home) as server:
        client = httpclient.InferenceServerClient(server.address)
        assert client.is_server_ready()
        assert not client.is_model_ready("broken")
        r = httpx.post(
            f"{server.url}/v2/models/broken/infer",
            json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        )
        assert r.status_code == 503
        assert "digest mismatch" in r.json()["error"] and bad.artifact_digest in r.json()["error"]
        ready = httpx.get(f"{server.url}/v2/models/broken/ready")
        assert ready.status_code == 503 and "digest mismatch" in ready.json()["error"]

        inp = httpclient.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(np.ones((2, 4), np.float32))
        assert client.infer("healthy", [inp]).as_numpy("y").shape == (2, 2)
