"""Artifacts encrypted at rest, end to end: registered with MAAS_ARTIFACT_KEY_FILE set, served by the real server and
checked by ``maas models verify``; a corrupted stored file is reported and refused, and a wrong key is named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as httpclient

from maas import runtimes
from maas.registry import Registry
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def maas(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=120)


def test_encrypted_artifacts_serve_verify_and_refuse_corruption(
    home: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    key = tmp_path / "artifact.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    env = {**cli_env, "MAAS_ARTIFACT_KEY_FILE": str(key)}
    model = make_linear_model(tmp_path / "linear.onnx")
    other = make_linear_model(tmp_path / "other.onnx", seed=1)
    for path, name in [(model, "linear"), (other, "other")]:
        r = maas(env, "models", "register", str(path), "--name", name)
        assert r.returncode == 0, r.stdout + r.stderr
    mv = Registry().get_version("linear", 1)  # reading metadata needs no key
    stored = home / "artifacts" / "sha256" / mv.artifact_digest[7:9] / mv.artifact_digest[7:]
    assert stored.is_file() and model.read_bytes()[-64:] not in stored.read_bytes()

    verify = maas(env, "models", "verify")
    assert verify.returncode == 0 and "2 ok, 0 failed" in verify.stdout, verify.stdout + verify.stderr

    reference = runtimes.load(model, "onnx").infer({"x": X})["y"]
    with RemoteServer(home, env={"MAAS_ARTIFACT_KEY_FILE": str(key)}) as server:
        client = httpclient.InferenceServerClient(server.address)
        inp = httpclient.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        np.testing.assert_allclose(client.infer("linear", [inp]).as_numpy("y"), reference, rtol=1e-6)
    copies = list((home / "cache" / "decrypted").rglob(mv.artifact_digest[7:]))
    assert [oct(p.stat().st_mode & 0o777) for p in copies] == ["0o400"]
    assert (home / "cache" / "decrypted").stat().st_mode & 0o777 == 0o700

    # A wrong key: named, never a crash or a silently wrong model.
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    bad_key = maas({**env, "MAAS_ARTIFACT_KEY_FILE": str(wrong)}, "models", "verify")
    assert bad_key.returncode == 1 and "0 ok, 2 failed" in bad_key.stdout
    assert "MAAS_ARTIFACT_KEY_FILE" in bad_key.stdout and "key id" in bad_key.stdout

    # One byte of the stored (encrypted) file changed: verify fails that version, the server refuses it.
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    verify = maas(env, "models", "verify")
    assert verify.returncode == 1 and "1 ok, 1 failed" in verify.stdout
    assert "linear/1" in verify.stdout and "fails authentication" in verify.stdout
    with RemoteServer(home, env={"MAAS_ARTIFACT_KEY_FILE": str(key)}) as server:
        r = httpx.post(
            f"{server.url}/v2/models/linear/infer",
            json={"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]},
        )
        assert r.status_code == 503 and "fails authentication" in r.json()["error"], r.text
        assert httpclient.InferenceServerClient(server.address).is_model_ready("other")
