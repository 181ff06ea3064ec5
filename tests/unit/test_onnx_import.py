"""The ONNX importer against onnxruntime: same outputs, trainable, and exportable again with a dynamic batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from maas.compression.onnx_import import import_onnx
from maas.errors import InvalidInput
from maas.runtimes.export import export
from maas.training.publish import ClassifierHead

pytestmark = pytest.mark.unit

TOL = 1e-5


def run_both(path: Path, feeds: dict[str, np.ndarray], module: nn.Module | None = None) -> None:
    """The imported module's outputs equal onnxruntime's (floats within TOL, integers exactly)."""
    module = module or import_onnx(path)
    expected = ort.InferenceSession(str(path)).run(None, feeds)
    with torch.no_grad():
        got = module(*(torch.from_numpy(v) for v in feeds.values()))
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape
        if want.dtype.kind == "f":
            np.testing.assert_allclose(have.numpy(), want, atol=TOL, rtol=0)
        else:
            np.testing.assert_array_equal(have.numpy(), want)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1, stride=1),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Conv2d(12, 16, 1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(16, 10),
        nn.Tanh(),
    )
    with torch.no_grad():  # non-trivial batch-norm statistics
        body[1].running_mean.uniform_(-0.5, 0.5)
        body[1].running_var.uniform_(0.5, 2.0)
    return ClassifierHead(body).eval()


def test_digits_classifier_matches_onnxruntime_trains_and_exports_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ClassifierHead(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))).eval()
    files = export(
        model, (torch.rand(4, 64),), tmp_path, name="digits", input_names=["input"],
        output_names=["probabilities", "label"], formats=("onnx",),
    )  # fmt: skip
    module = import_onnx(files["onnx"])
    # Weights keep their ONNX names, so layers keep their names through an import/export round trip.
    assert {n for n, _ in module.named_parameters()} == {
        "model.0.weight",
        "model.0.bias",
        "model.2.weight",
        "model.2.bias",
    }
    x = np.random.default_rng(0).random((7, 64), dtype=np.float32)
    run_both(files["onnx"], {"input": x}, module)

    probabilities, _ = module(torch.from_numpy(x))
    torch.log(probabilities[:, 3]).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    again = export(
        module, (torch.rand(2, 64),), tmp_path / "again", input_names=["input"],
        output_names=["probabilities", "label"],
    )  # fmt: skip
    run_both(again["onnx"], {"input": x}, module)  # batch 7 though exported with 2: the batch stays dynamic
    reloaded = torch.export.load(again["torch_export"]).module()
    np.testing.assert_allclose(reloaded(torch.from_numpy(x))[0].detach(), module(torch.from_numpy(x))[0].detach())


def test_cnn_matches_onnxruntime(tmp_path: Path) -> None:
    files = export(cnn(), (torch.rand(2, 1, 8, 8),), tmp_path, name="cnn", formats=("onnx",))
    x = np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32)
    run_both(files["onnx"], {"x": x})


def _hand_built(path: Path) -> None:
    """Ops the torch exporter folds away or writes only for other models: BatchNormalization, MatMul + Add,
    shape arithmetic for a dynamic batch, Gemm without transB, Transpose, Cast, Constant, reductions."""
    rng = np.random.default_rng(0)

    def init(name: str, array: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(array, name)

    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [
        init("conv.weight", f32(4, 2, 3, 3)), init("bn.scale", f32(4)), init("bn.bias", f32(4)),
        init("bn.mean", f32(4)), init("bn.var", np.abs(f32(4)) + 0.5),
        init("fc.weight", f32(16, 6)), init("fc.bias", f32(6)), init("gemm.weight", f32(6, 5)),
        init("gemm.c", f32(5)), init("minus_one", np.array([-1], dtype=np.int64)),
        init("zero", np.array(0, dtype=np.int64)), init("axes", np.array([0], dtype=np.int64)),
        init("mean_axes", np.array([1], dtype=np.int64)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        # flatten [N, 4, 2, 2] -> [N, 16] through Shape -> Gather -> Unsqueeze -> Concat -> Reshape
        helper.make_node("Shape", ["p"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["p", "new_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc.weight"], ["mm"]),
        helper.make_node("Add", ["mm", "fc.bias"], ["h"]),
        helper.make_node("Erf", ["h"], ["e"]),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("Mul", ["e", "half"], ["eh"]),
        helper.make_node("Dropout", ["eh"], ["d"]),
        helper.make_node("Gemm", ["d", "gemm.weight", "gemm.c"], ["g"], alpha=0.5, beta=2.0),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Sub", ["s", "half"], ["sub"]),
        helper.make_node("Div", ["sub", "half"], ["div"]),
        helper.make_node("Softmax", ["div"], ["probs"], axis=-1),
        helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=1),
        helper.make_node("GlobalAveragePool", ["r"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["gap_flat"], axis=1),
        helper.make_node("Transpose", ["gap_flat"], ["gap_t"], perm=[1, 0]),
        helper.make_node("ReduceMean", ["gap_t", "mean_axes"], ["mean"], keepdims=0),
        helper.make_node("Cast", ["label"], ["label_f"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["mean"], ["mean_out"]),
    ]
    graph = helper.make_graph(
        nodes, "hand_built",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N", 1]),
            helper.make_tensor_value_info("label_f", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("mean_out", TensorProto.FLOAT, [4]),
        ],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())


def test_hand_built_graph_with_shape_arithmetic_matches_and_keeps_a_dynamic_batch(tmp_path: Path) -> None:
    path = tmp_path / "hand.onnx"
    _hand_built(path)
    module = import_onnx(path)
    buffers = dict(module.named_buffers())
    assert "bn.mean" in buffers and "bn.var" in buffers  # statistics are buffers, not trained
    assert "bn.scale" in dict(module.named_parameters())
    for n in (3, 6):
        run_both(path, {"x": np.random.default_rng(n).random((n, 2, 4, 4), dtype=np.float32)}, module)
    again = export(module, (torch.rand(3, 2, 4, 4),), tmp_path / "again", formats=("onnx",))
    x = np.random.default_rng(9).random((5, 2, 4, 4), dtype=np.float32)
    expected = ort.InferenceSession(str(path)).run(None, {"x": x})
    got = ort.InferenceSession(str(again["onnx"])).run(None, {"x": x})
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, atol=TOL, rtol=0)


def test_unsupported_op_names_it_and_the_way_out(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["y"], name="nz")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])],
    )  # fmt: skip
    path = tmp_path / "nz.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    with pytest.raises(InvalidInput, match=r"'NonZero'.*torch_export"):
        import_onnx(path)
