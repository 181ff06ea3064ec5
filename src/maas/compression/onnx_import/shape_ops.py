"""Handlers for ONNX ops that make or move data rather than compute on it: constants, casts, shapes, slices.

Ops over sizes (``Shape``, ``Gather`` of a shape, ``Concat`` of sizes, …) run on Python ints through the
``size_*`` functions of :mod:`~maas.compression.onnx_import.kernels`, so ``torch.export`` sees a dynamic
batch as a symbolic size rather than as data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from maas.compression.onnx_import import kernels as k
from maas.compression.onnx_import.builder import Builder, torch_dtype
from maas.compression.onnx_import.handlers import Handler, registrar, static, unsupported

OPS: dict[str, Handler] = {}
op = registrar(OPS)


@op("Constant")
def _constant(b: Builder, node: onnx.NodeProto, attrs: dict[str, Any]) -> Any:
    if "value" in attrs:
        array = numpy_helper.to_array(attrs["value"])
    elif "value_float" in attrs or "value_int" in attrs:
        array = np.array(attrs.get("value_float", attrs.get("value_int")))
    elif "value_floats" in attrs or "value_ints" in attrs:
        array = np.array(attrs.get("value_floats", attrs.get("value_ints")))
    else:
        raise unsupported(b, node, f"has a {', '.join(attrs)} value")
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
        raise unsupported(b, node, "takes its shape from a computed tensor")
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
    axes = static(b, node, 1, "axes") if b.opset >= 13 else attrs.get("axes")
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
        starts, ends = static(b, node, 1, "starts"), static(b, node, 2, "ends")
        axes, steps = static(b, node, 3, "axes"), static(b, node, 4, "steps")
    else:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    value = b.value(node.input[0])
    if not b.is_tensor(value):
        if list(axes) not in ([0], [-1]):
            raise unsupported(b, node, "slices a shape along an axis other than 0")
        return b.shape_call(k.size_slice, value, starts[0], ends[0], steps[0])
    if any(st <= 0 for st in steps):
        raise unsupported(b, node, "has a non-positive step")
    return b.call(k.slice_tensor, value, list(starts), list(ends), list(axes), list(steps))
