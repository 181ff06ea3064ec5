"""One handler per ONNX op for :mod:`maas.compression.onnx_import`.

A handler reads its node's inputs from the :class:`~maas.compression.onnx_import.Builder` and writes the
torch call that computes the node (a plain ``torch`` / ``torch.nn.functional`` function wherever one
matches, so that graph passes such as pruning recognise ``F.linear`` and ``F.conv2d``). Ops over sizes
(``Shape``, ``Gather`` of a shape, ``Concat`` of sizes, …) run on Python ints through the ``_size_*``
helpers below.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import fx

from maas.compression import onnx_kernels as k
from maas.compression.onnx_import import Builder, torch_dtype
from maas.errors import InvalidInput

Handler = Callable[[Builder, onnx.NodeProto, dict[str, Any]], Any]
OPS: dict[str, Handler] = {}


def op(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _unsupported(b: Builder, node: onnx.NodeProto, why: str) -> InvalidInput:
    return InvalidInput(
        f"{b.source}: node {node.name or node.output[0]!r} ({node.op_type}) {why}; the ONNX importer cannot convert "
        "it. Register the model as torch_export (a .pt2 written by torch.export) to compress it"
    )


def _ins(b: Builder, node: onnx.NodeProto) -> list[Any]:
    return [b.tensor(n) for n in node.input]


def _static(b: Builder, node: onnx.NodeProto, index: int, what: str) -> Any:
    """An input that must be known when importing (axes, pads, a constant shape)."""
    if index >= len(node.input) or not node.input[index]:
        return None
    value = b.value(node.input[index])
    if isinstance(value, fx.Node):
        raise _unsupported(b, node, f"takes its {what} from a computed tensor, not a constant")
    return value


# -- handlers -------------------------------------------------------------------------------------------


_UNARY: dict[str, Callable[..., torch.Tensor]] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Softplus": F.softplus,
    "Sin": torch.sin,
    "Cos": torch.cos,
}


@op(*_UNARY)
def _unary(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    return b.call(_UNARY[node.op_type], b.tensor(node.input[0]))


@op("Identity", "Dropout")
def _identity(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    return b.value(node.input[0])  # Dropout is the identity at inference (its optional mask is refused)


@op("LeakyRelu")
def _leaky_relu(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    return b.call(F.leaky_relu, b.tensor(node.input[0]), attrs.get("alpha", 0.01))


@op("Elu")
def _elu(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    return b.call(F.elu, b.tensor(node.input[0]), attrs.get("alpha", 1.0))


@op("HardSigmoid")
def _hard_sigmoid(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    x = b.call(torch.mul, b.tensor(node.input[0]), attrs.get("alpha", 0.2))
    return b.call(torch.clamp, b.call(torch.add, x, attrs.get("beta", 0.5)), 0.0, 1.0)


@op("Gelu")
def _gelu(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    approximate = attrs.get("approximate", b"none")
    return b.call(F.gelu, b.tensor(node.input[0]), approximate=approximate.decode())


@op("Clip")
def _clip(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    lo = _static(b, node, 1, "minimum") if b.opset >= 11 else attrs.get("min")
    hi = _static(b, node, 2, "maximum") if b.opset >= 11 else attrs.get("max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        raise _unsupported(b, node, "has tensor bounds")
    return b.call(torch.clamp, b.tensor(node.input[0]), lo, hi)


_ARITH: dict[str, tuple[Callable[..., torch.Tensor], Callable[[Any, Any], Any]]] = {
    "Add": (torch.add, operator.add),
    "Sub": (torch.sub, operator.sub),
    "Mul": (torch.mul, operator.mul),
    "Div": (torch.div, k.size_floordiv),
    "Pow": (torch.pow, operator.pow),
}


@op(*_ARITH)
def _arith(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    tensor_fn, size_fn = _ARITH[node.op_type]
    left, right = b.value(node.input[0]), b.value(node.input[1])
    if not b.is_tensor(left) and not b.is_tensor(right):
        return b.shape_call(k.size_arith, size_fn, left, right)
    if node.op_type == "Div" and isinstance(left, fx.Node) and _is_int(b, node.input[0]):
        return b.call(torch.div, b.tensor(node.input[0]), b.tensor(node.input[1]), rounding_mode="trunc")
    return b.call(tensor_fn, b.tensor(node.input[0]), b.tensor(node.input[1]))


def _is_int(b: Builder, name: str) -> bool:
    init = b.initializers.get(name)
    return init is not None and init.data_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64)


@op("MatMul")
def _matmul(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    return b.call(torch.matmul, *_ins(b, node))


@op("Gemm")
def _gemm(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    a, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    c = b.tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = b.call(torch.t, a)
    c_init = b.initializers.get(node.input[2]) if c is not None else None
    if attrs.get("transB", 0) and alpha == 1.0 and beta == 1.0 and (c is None or (c_init and len(c_init.dims) == 1)):
        return b.call(F.linear, a, w, c)  # the common case: a Linear layer (weight [out, in], bias [out])
    y = b.call(torch.matmul, a, b.call(torch.t, w) if attrs.get("transB", 0) else w)
    if alpha != 1.0:
        y = b.call(torch.mul, y, alpha)
    if c is not None:
        y = b.call(torch.add, y, c if beta == 1.0 else b.call(torch.mul, c, beta))
    return y


@op("Conv")
def _conv(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    x, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    bias = b.tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    init = b.initializers.get(node.input[1])
    kernel = attrs.get("kernel_shape") or (list(init.dims[2:]) if init is not None else None)
    if kernel is None or len(kernel) not in (1, 2, 3):
        raise _unsupported(b, node, "has no constant kernel of 1 to 3 dimensions")
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    x, padding = _pads(b, node, attrs, x, len(kernel), 0.0)
    stride = attrs.get("strides", [1] * len(kernel))
    dilation = attrs.get("dilations", [1] * len(kernel))
    return b.call(fn, x, w, bias, list(stride), padding, list(dilation), attrs.get("group", 1))


def _pads(
    b: Builder, node: onnx.NodeProto, attrs: dict[str, Any], x: Any, dims: int, fill: float
) -> tuple[Any, list[int]]:
    """Symmetric pads as torch's ``padding``; asymmetric ones as an explicit ``F.pad`` first."""
    auto = attrs.get("auto_pad", b"NOTSET")
    if auto not in (b"NOTSET", b"VALID"):
        raise _unsupported(b, node, f"uses auto_pad={auto.decode()}")
    pads = list(attrs.get("pads", [0] * 2 * dims)) if auto == b"NOTSET" else [0] * 2 * dims
    begin, end = pads[:dims], pads[dims:]
    if begin == end:
        return x, begin
    torch_pads = [p for i in reversed(range(dims)) for p in (begin[i], end[i])]
    return b.call(F.pad, x, torch_pads, "constant", fill), [0] * dims


@op("MaxPool", "AveragePool")
def _pool(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    kernel = list(attrs["kernel_shape"])
    if len(kernel) not in (1, 2, 3):
        raise _unsupported(b, node, f"pools over {len(kernel)} dimensions")
    stride = list(attrs.get("strides", [1] * len(kernel)))
    ceil = bool(attrs.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        x, padding = _pads(b, node, attrs, b.tensor(node.input[0]), len(kernel), -math.inf)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
        dilation = list(attrs.get("dilations", [1] * len(kernel)))
        return b.call(fn, x, kernel, stride, padding, dilation, ceil)
    include_pad = bool(attrs.get("count_include_pad", 0))
    pads = list(attrs.get("pads", []))
    if pads and pads[: len(kernel)] != pads[len(kernel) :] and not include_pad:
        raise _unsupported(b, node, "has asymmetric pads that are left out of the average")
    x, padding = _pads(b, node, attrs, b.tensor(node.input[0]), len(kernel), 0.0)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    return b.call(fn, x, kernel, stride, padding, ceil, include_pad)


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    fn = k.global_mean if node.op_type == "GlobalAveragePool" else k.global_max
    return b.call(fn, b.tensor(node.input[0]))


@op("BatchNormalization")
def _batch_norm(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    if attrs.get("training_mode", 0):
        raise _unsupported(b, node, "is in training mode")
    x, scale, bias, mean, var = _ins(b, node)[:5]
    return b.call(F.batch_norm, x, mean, var, scale, bias, False, 0.1, attrs.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layer_norm(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    scale = b.initializers.get(node.input[1])
    axis = attrs.get("axis", -1)
    if scale is None or axis >= 0 or len(scale.dims) != -axis:
        raise _unsupported(b, node, "normalises over axes that its constant scale does not describe")
    x, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    bias = b.tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return b.call(F.layer_norm, x, list(scale.dims), w, bias, attrs.get("epsilon", 1e-5))


@op("Softmax", "LogSoftmax")
def _softmax(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    x = b.tensor(node.input[0])
    if b.opset < 13:
        return b.call(k.softmax_2d, fn, x, attrs.get("axis", 1))
    return b.call(fn, x, attrs.get("axis", -1))


@op("ArgMax", "ArgMin")
def _argmax(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    axis, keepdim = attrs.get("axis", 0), bool(attrs.get("keepdims", 1))
    x = b.tensor(node.input[0])
    if attrs.get("select_last_index", 0):
        return b.call(k.argmax_last, fn, x, axis, keepdim)
    return b.call(fn, x, axis, keepdim)


_REDUCE: dict[str, Callable[..., torch.Tensor]] = {
    "ReduceMean": torch.mean,
    "ReduceSum": torch.sum,
    "ReduceMax": torch.amax,
    "ReduceMin": torch.amin,
}


@op(*_REDUCE)
def _reduce(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    axes_from_input = b.opset >= 18 or (node.op_type == "ReduceSum" and b.opset >= 13)
    axes = _static(b, node, 1, "axes") if axes_from_input else attrs.get("axes")
    x = b.tensor(node.input[0])
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = None
    keepdim = bool(attrs.get("keepdims", 1))
    if axes is None:
        return b.call(k.reduce_all, _REDUCE[node.op_type], x, keepdim)
    return b.call(_REDUCE[node.op_type], x, list(k.as_list(axes)), keepdim)


@op("Constant")
def _constant(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    if "value" in attrs:
        array = onnx.numpy_helper.to_array(attrs["value"])
    elif "value_float" in attrs or "value_int" in attrs:
        import numpy as np

        array = np.array(attrs.get("value_float", attrs.get("value_int")))
    elif "value_floats" in attrs or "value_ints" in attrs:
        import numpy as np

        array = np.array(attrs.get("value_floats", attrs.get("value_ints")))
    else:
        raise _unsupported(b, node, f"has a {', '.join(attrs)} value")
    return b.constant(array, node.output[0])


@op("Cast")
def _cast(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    dtype = torch_dtype(attrs["to"], f"{b.source}: node {node.name!r} (Cast)")
    value = b.value(node.input[0])
    if not b.is_tensor(value) and not dtype.is_floating_point and dtype != torch.bool:
        return value  # sizes stay Python ints
    return b.call(torch.Tensor.to, b.tensor(node.input[0]), dtype)


@op("Shape")
def _shape(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    node_ = b.call(k.size_shape, b.tensor(node.input[0]), attrs.get("start", 0), attrs.get("end"))
    b.shape_nodes.add(node_)
    return node_


@op("Reshape")
def _reshape_op(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    shape = b.value(node.input[1])
    if b.is_tensor(shape):
        raise _unsupported(b, node, "takes its shape from a computed tensor")
    x = b.tensor(node.input[0])
    if not isinstance(shape, fx.Node) and (attrs.get("allowzero", 0) or 0 not in shape):
        return b.call(torch.reshape, x, list(shape))
    return b.call(k.reshape, x, shape, attrs.get("allowzero", 0))


@op("Flatten")
def _flatten_op(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    axis = attrs.get("axis", 1)
    x = b.tensor(node.input[0])
    return b.call(torch.flatten, x, 1) if axis == 1 else b.call(k.flatten, x, axis)


@op("Transpose")
def _transpose_op(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    x = b.tensor(node.input[0])
    perm = attrs.get("perm")
    return b.call(torch.permute, x, list(perm)) if perm else b.call(k.transpose, x)


@op("Unsqueeze", "Squeeze")
def _unsqueeze_op(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    axes = _static(b, node, 1, "axes") if b.opset >= 13 else attrs.get("axes")
    value = b.value(node.input[0])
    if not b.is_tensor(value):
        return b.shape_call(k.size_unsqueeze if node.op_type == "Unsqueeze" else k.size_squeeze, value)
    if node.op_type == "Unsqueeze":
        return b.call(k.unsqueeze, value, list(k.as_list(axes)))
    return b.call(torch.squeeze, value, list(k.as_list(axes))) if axes is not None else b.call(torch.squeeze, value)


@op("Concat")
def _concat(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    values = [b.value(n) for n in node.input]
    if not any(b.is_tensor(v) for v in values):
        return b.shape_call(k.size_concat, *values)
    return b.call(torch.cat, [b.tensor(n) for n in node.input], attrs.get("axis", 0))


@op("Gather")
def _gather_op(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    data, idx = b.value(node.input[0]), b.value(node.input[1])
    axis = attrs.get("axis", 0)
    if not b.is_tensor(data) and not b.is_tensor(idx) and axis == 0:
        return b.shape_call(k.size_gather, data, idx)
    if isinstance(idx, int):
        return b.call(torch.select, b.tensor(node.input[0]), axis, idx)
    return b.call(k.gather, b.tensor(node.input[0]), b.tensor(node.input[1]), axis)


@op("Slice")
def _slice(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    if b.opset >= 10:
        starts, ends = _static(b, node, 1, "starts"), _static(b, node, 2, "ends")
        axes, steps = _static(b, node, 3, "axes"), _static(b, node, 4, "steps")
    else:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    value = b.value(node.input[0])
    if not b.is_tensor(value):
        if list(axes) not in ([0], [-1]):
            raise _unsupported(b, node, "slices a shape along an axis other than 0")
        return b.shape_call(k.size_slice, value, starts[0], ends[0], steps[0])
    if any(st <= 0 for st in steps):
        raise _unsupported(b, node, "has a non-positive step")
    return b.call(k.slice_tensor, value, list(starts), list(ends), list(axes), list(steps))
