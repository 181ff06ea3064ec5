"""Handlers for the ONNX ops that hold weights or windows: ``MatMul``, ``Gemm``, ``Conv``, pooling, norms.

``Gemm`` with a transposed weight and a 1-D bias becomes ``F.linear`` and ``Conv`` becomes ``F.conv1d/2d/3d``,
the calls pruning recognises as layers.
"""

from __future__ import annotations

import math
from typing import Any

import onnx
import torch
import torch.nn.functional as F

from maas.compression.onnx_import import kernels as k
from maas.compression.onnx_import.builder import Builder
from maas.compression.onnx_import.handlers import Handler, registrar, tensor_inputs, unsupported

OPS: dict[str, Handler] = {}
op = registrar(OPS)


@op("MatMul")
def _matmul(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    return b.call(torch.matmul, *tensor_inputs(b, node))


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
        raise unsupported(b, node, "has no constant kernel of 1 to 3 dimensions")
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
        raise unsupported(b, node, f"uses auto_pad={auto.decode()}")
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
        raise unsupported(b, node, f"pools over {len(kernel)} dimensions")
    stride = list(attrs.get("strides", [1] * len(kernel)))
    ceil = bool(attrs.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        x, padding = _pads(b, node, attrs, b.tensor(node.input[0]), len(kernel), -math.inf)
        max_pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
        dilation = list(attrs.get("dilations", [1] * len(kernel)))
        return b.call(max_pool, x, kernel, stride, padding, dilation, ceil)
    include_pad = bool(attrs.get("count_include_pad", 0))
    pads = list(attrs.get("pads", []))
    if pads and pads[: len(kernel)] != pads[len(kernel) :] and not include_pad:
        raise unsupported(b, node, "has asymmetric pads that are left out of the average")
    x, padding = _pads(b, node, attrs, b.tensor(node.input[0]), len(kernel), 0.0)
    avg_pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    return b.call(avg_pool, x, kernel, stride, padding, ceil, include_pad)


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    fn = k.global_mean if node.op_type == "GlobalAveragePool" else k.global_max
    return b.call(fn, b.tensor(node.input[0]))


@op("BatchNormalization")
def _batch_norm(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    if attrs.get("training_mode", 0):
        raise unsupported(b, node, "is in training mode")
    x, scale, bias, mean, var = tensor_inputs(b, node)[:5]
    return b.call(F.batch_norm, x, mean, var, scale, bias, False, 0.1, attrs.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layer_norm(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    scale = b.initializers.get(node.input[1])
    axis = attrs.get("axis", -1)
    if scale is None or axis >= 0 or len(scale.dims) != -axis:
        raise unsupported(b, node, "normalises over axes that its constant scale does not describe")
    x, w = b.tensor(node.input[0]), b.tensor(node.input[1])
    bias = b.tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return b.call(F.layer_norm, x, list(scale.dims), w, bias, attrs.get("epsilon", 1e-5))
