"""Artifacts in a real S3-compatible server (SeaweedFS): register, serve, verify; a corrupted object is refused with
the digest error; multipart uploads; ``kill -9`` mid-upload leaves no version, and ``maas gc`` aborts the upload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from maas.registry import Registry, encryption
from maas.testing import processes
from maas.testing.models import make_linear_model, make_multi_io_model, save_graph
from maas.testing.server import RemoteServer
from tests.seaweedfs_fixture import SeaweedS3, seaweed  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_env(seaweed: SeaweedS3, home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:  # noqa: F811
    """This test's settings: artifacts under their own prefix of the bucket, for Python and for ``maas`` children."""
    settings = seaweed.env(f"t-{uuid.uuid4().hex[:8]}")
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, "MAAS_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1", **settings}


def maas(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return processes.run([sys.executable, "-m", "maas", *args], env=env, timeout=120, text=True)


def objects(seaweed: SeaweedS3, env: dict[str, str]) -> list[str]:  # noqa: F811
    prefix = env["MAAS_ARTIFACTS_URL"].removeprefix(f"s3://{seaweed.bucket}/") + "/"
    listing = seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix)
    return [str(o["Key"]) for o in listing.get("Contents", [])]


def uploads(seaweed: SeaweedS3, env: dict[str, str]) -> list[dict[str, str]]:  # noqa: F811
    prefix = env["MAAS_ARTIFACTS_URL"].removeprefix(f"s3://{seaweed.bucket}/") + "/"
    found: list[dict[str, str]] = (
        seaweed.client().list_multipart_uploads(Bucket=seaweed.bucket, Prefix=prefix).get("Uploads", [])
    )
    return found


def key_of(env: dict[str, str], digest: str) -> str:
    hexdigest = digest.removeprefix("sha256:")
    prefix = env["MAAS_ARTIFACTS_URL"].split("/", 3)[3]
    return f"{prefix}/sha256/{hexdigest[:2]}/{hexdigest}"


def make_big_model(path: Path, megabytes: int) -> Path:
    """``y = x + W[0]`` over a random ``W`` of about ``megabytes`` MB: an ONNX file large enough to upload in parts."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).standard_normal(((megabytes << 20) // 16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "zero"], ["w0"], axis=0), helper.make_node("Add", ["x", "w0"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array(0, np.int64), "zero")],
    )
    return save_graph(graph, path)


def infer_linear(server: RemoteServer, name: str) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.address)
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(np.ones((2, 4), np.float32))
    out: np.ndarray = client.infer(name, [inp]).as_numpy("y")
    return out


def test_register_serve_verify_and_refuse_a_corrupted_object(
    seaweed: SeaweedS3,  # noqa: F811
    s3_env: dict[str, str],
    home: Path,
    tmp_path: Path,
) -> None:
    reg = Registry()
    bad = reg.register(make_multi_io_model(tmp_path / "a.onnx"), "broken", alias="production")
    out = maas(s3_env, "models", "register", str(make_linear_model(tmp_path / "b.onnx")), "--name", "healthy", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    good = json.loads(out.stdout)
    assert sorted(objects(seaweed, s3_env)) == sorted(
        key_of(s3_env, d) for d in (bad.artifact_digest, good["artifact_digest"])
    )
    assert not (home / "artifacts").exists()  # nothing stored locally
    verify = maas(s3_env, "models", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    with RemoteServer(home, env=s3_env) as server:
        assert infer_linear(server, "healthy").shape == (2, 2)
        client = httpclient.InferenceServerClient(server.address)
        assert client.is_model_ready("broken")
    assert reg.artifact_path(bad).read_bytes() == (tmp_path / "a.onnx").read_bytes()  # the verified local copy

    # Another file's bytes under broken's address, written through the S3 API.
    seaweed.client().put_object(
        Bucket=seaweed.bucket, Key=key_of(s3_env, bad.artifact_digest), Body=(tmp_path / "b.onnx").read_bytes()
    )
    verify = maas(s3_env, "models", "verify")
    assert verify.returncode != 0
    assert "digest mismatch" in verify.stdout and bad.artifact_digest in verify.stdout, verify.stdout
    assert good["artifact_digest"] in verify.stdout and "healthy/1" in verify.stdout

    with RemoteServer(home, env=s3_env) as server:
        r = httpx.post(
            f"{server.url}/v2/models/broken/infer",
            json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        )
        assert r.status_code == 503
        assert "digest mismatch" in r.json()["error"] and bad.artifact_digest in r.json()["error"]
        assert infer_linear(server, "healthy").shape == (2, 2)


def test_multipart_upload_with_encryption(
    seaweed: SeaweedS3,  # noqa: F811
    s3_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = tmp_path / "artifact.key"
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o600)
    monkeypatch.setenv("MAAS_ARTIFACT_KEY_FILE", str(key_file))
    monkeypatch.setenv("MAAS_S3_MULTIPART_THRESHOLD_MB", "5")
    model = make_big_model(tmp_path / "big.onnx", 12)
    reg = Registry()
    mv = reg.register(model, "big")

    head = seaweed.client().head_object(Bucket=seaweed.bucket, Key=key_of(s3_env, mv.artifact_digest))
    assert head["ETag"].strip('"').endswith("-3")  # 12 MB in three 5 MiB parts
    stored = seaweed.client().get_object(Bucket=seaweed.bucket, Key=key_of(s3_env, mv.artifact_digest))["Body"].read()
    assert stored.startswith(encryption.MAGIC) and model.read_bytes()[-4096:] not in stored
    copy = reg.artifact_path(mv)
    assert copy.read_bytes() == model.read_bytes()  # decrypted into the local copy
    assert reg.verify().versions[0].ok

    reg.delete_version("big", mv.version)
    assert objects(seaweed, s3_env) == [] and not copy.exists()


def test_kill_mid_upload_leaves_no_version_and_gc_aborts_it(
    seaweed: SeaweedS3,  # noqa: F811
    s3_env: dict[str, str],
    home: Path,
    tmp_path: Path,
) -> None:
    model = make_big_model(tmp_path / "big.onnx", 30)
    env = {**s3_env, "MAAS_S3_MULTIPART_THRESHOLD_MB": "5", "MAAS_S3_PART_DELAY_S": "5"}
    proc = processes.popen(
        [sys.executable, "-m", "maas", "models", "register", str(model), "--name", "big"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    client = seaweed.client()
    while True:  # until some parts are stored (the rest wait on the hook)
        assert proc.poll() is None and time.monotonic() < deadline, "the registration ended before it was killed"
        found = uploads(seaweed, s3_env)
        if found and client.list_parts(Bucket=seaweed.bucket, Key=found[0]["Key"], UploadId=found[0]["UploadId"]).get(
            "Parts"
        ):
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    assert Registry().list_models() == []
    assert objects(seaweed, s3_env) == []  # the object never appeared
    assert len(uploads(seaweed, s3_env)) == 1
    verify = maas(env, "models", "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert sorted(d["kind"] for d in json.loads(verify.stdout)["debris"]) == ["scratch", "upload"]  # what it left

    gc = maas(env, "gc")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert uploads(seaweed, s3_env) == []  # aborted: its parts are freed
    assert list((home / "cache" / "s3" / "tmp").iterdir()) == []

    done = maas(env, "models", "register", str(model), "--name", "big")  # and a new registration succeeds
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(objects(seaweed, s3_env)) == 1


def test_wrong_credentials_and_bucket_are_named(
    seaweed: SeaweedS3,  # noqa: F811
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    model = str(make_linear_model(tmp_path / "m.onnx"))
    wrong = maas({**s3_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "models", "register", model, "--name", "m")
    assert wrong.returncode == 1
    assert "refused the credentials" in wrong.stderr and "AWS_SECRET_ACCESS_KEY" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr

    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/p"
    missing = maas({**s3_env, "MAAS_ARTIFACTS_URL": url}, "models", "register", model, "--name", "m")
    assert missing.returncode == 1 and "does not exist" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr
    assert Registry().list_models() == []
