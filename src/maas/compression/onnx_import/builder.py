"""The state of one ONNX import: the fx graph being written, the module holding the weights, the values so far.

Float initializers become ``nn.Parameter``s registered under their ONNX names (``model.0.weight`` stays
``model.0.weight``, so layer names survive an export round trip); integer initializers and batch-norm
statistics become buffers. Small integer constants (shapes, axes, indices) are kept as Python values.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from maas.errors import InvalidInput

#: Integer tensors up to this many elements (and at most 1-D) are kept as Python values: shapes, axes, indices.
SMALL_INT = 64

_ONNX_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}

#: Inputs of these ops (by position) that are statistics, not weights: registered as buffers.
_BUFFER_INPUTS: dict[str, tuple[int, ...]] = {"BatchNormalization": (3, 4)}


def torch_dtype(onnx_type: int, what: str) -> torch.dtype:
    if onnx_type not in _ONNX_DTYPES:
        name = onnx.TensorProto.DataType.Name(onnx_type)
        raise InvalidInput(f"{what}: ONNX element type {name} has no torch equivalent the importer supports")
    return _ONNX_DTYPES[onnx_type]


def _is_small_int(array: np.ndarray) -> bool:
    return array.dtype.kind in "iu" and array.ndim <= 1 and array.size <= SMALL_INT


def attr_name(part: str) -> str:
    """``part`` as a Python identifier that is not an ``nn.Module`` attribute."""
    name = re.sub(r"\W", "_", part) or "_"
    return f"_{name}" if hasattr(nn.Module, name) or name.startswith("__") else name


class Builder:
    """The state of one import: the fx graph being written, the root module holding the weights, and the
    value of every ONNX tensor name so far (an fx ``Node``, or a Python value for folded constants)."""

    def __init__(self, model: onnx.ModelProto, source: str) -> None:
        self.source = source
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, Any] = {}
        #: Nodes whose run-time value is a Python list of sizes (``Shape`` and what is computed from it).
        self.shape_nodes: set[fx.Node] = set()
        self.initializers = {t.name: t for t in model.graph.initializer}
        self._buffer_names = {
            node.input[i]
            for node in model.graph.node
            for i in _BUFFER_INPUTS.get(node.op_type, ())
            if i < len(node.input)
        }
        self._aliases = _weight_aliases(model)
        self._const_targets: dict[str, str] = {}
        self._count = 0

    # -- values ---------------------------------------------------------------------------------------

    def value(self, name: str) -> Any:
        """The value of an ONNX tensor name: an fx node, or a Python value for a folded constant (None when
        the optional input is absent)."""
        if name == "":
            return None
        if name not in self.env:
            if name not in self.initializers:
                raise InvalidInput(
                    f"{self.source}: tensor {name!r} is used before it is produced; the graph is invalid"
                )
            self.env[name] = self.constant(numpy_helper.to_array(self.initializers[name]), name)
        return self.env[name]

    def constant(self, array: np.ndarray, name: str) -> Any:
        """A small integer constant as a Python value, anything else as a registered parameter or buffer."""
        if _is_small_int(array):
            return array.tolist()
        tensor = torch.from_numpy(np.array(array, copy=True))
        trainable = tensor.is_floating_point() and tensor.ndim >= 1 and name in self.initializers
        trainable = trainable and name not in self._buffer_names
        target = self._register(self._aliases.get(name, name), nn.Parameter(tensor) if trainable else tensor)
        return self.graph.get_attr(target)

    def tensor(self, name: str) -> fx.Node | None:
        """The value as a tensor node, turning a Python constant or a list of sizes into a tensor."""
        value = self.value(name)
        if value is None or (isinstance(value, fx.Node) and value not in self.shape_nodes):
            return value
        if isinstance(value, fx.Node):
            return self.call(torch.tensor, value, dtype=torch.int64)
        if name not in self._const_targets:
            self._const_targets[name] = self._register(f"{name}_const", torch.tensor(value))
        return self.graph.get_attr(self._const_targets[name])

    def is_tensor(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and value not in self.shape_nodes

    def _register(self, name: str, tensor: torch.Tensor) -> str:
        """Register under the dotted ONNX name (sub-modules for the dots) where possible, else a flat name."""
        parts = [attr_name(p) for p in name.split(".")]
        owner = self.root
        ok = True
        for part in parts[:-1]:
            child = owner._modules.get(part)
            if child is None:
                if hasattr(owner, part):
                    ok = False
                    break
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if not ok or hasattr(owner, parts[-1]):
            self._count += 1
            owner, parts = self.root, [f"_onnx_{self._count}_{attr_name(name)}"]
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(parts[-1], tensor)
        else:
            owner.register_buffer(parts[-1], tensor)
        return ".".join(parts)

    # -- nodes ----------------------------------------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, tuple(args), kwargs)

    def shape_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn`` over sizes: folded now when every argument is known, else a node returning a list of sizes."""
        if not any(isinstance(a, fx.Node) for a in args):
            return fn(*args)
        node = self.call(fn, *args)
        self.shape_nodes.add(node)
        return node


def _weight_aliases(model: onnx.ModelProto) -> dict[str, str]:
    """Names for weights the torch exporter made up (``val_3``: a Linear's weight, transposed for ``MatMul``),
    from the module path it records on the node (``pkg.torch.onnx.name_scopes``): ``encoder.0.weight``."""
    taken = {t.name for t in model.graph.initializer}
    aliases: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in taken or not re.fullmatch(r"val_\d+", weight) or weight in aliases:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        if isinstance(scopes, list) and len(scopes) >= 3 and all(isinstance(x, str) for x in scopes):
            alias = ".".join(scopes[1:-1]) + ".weight"
            if alias not in taken and alias not in aliases.values():
                aliases[weight] = alias
    return aliases
