"""Handlers for element-wise ONNX ops, activations, softmax and reductions.

Arithmetic on sizes (``Shape`` and what is computed from it) stays on Python ints through
:func:`~maas.compression.onnx_import.kernels.size_arith`, so ``torch.export`` sees a symbolic batch size.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import fx

from maas.compression.onnx_import import kernels as k
from maas.compression.onnx_import.builder import Builder
from maas.compression.onnx_import.handlers import Handler, registrar, static, unsupported

OPS: dict[str, Handler] = {}
op = registrar(OPS)

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
    lo = static(b, node, 1, "minimum") if b.opset >= 11 else attrs.get("min")
    hi = static(b, node, 2, "maximum") if b.opset >= 11 else attrs.get("max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        raise unsupported(b, node, "has tensor bounds")
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
    axes = static(b, node, 1, "axes") if axes_from_input else attrs.get("axes")
    x = b.tensor(node.input[0])
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = None
    keepdim = bool(attrs.get("keepdims", 1))
    if axes is None:
        return b.call(k.reduce_all, _REDUCE[node.op_type], x, keepdim)
    return b.call(_REDUCE[node.op_type], x, list(k.as_list(axes)), keepdim)
