"""Which layers of a graph can lose units (neurons, output channels), and what else must shrink with them.

A weight layer (``linear``, ``matmul`` by a weight, ``conv``) is prunable when its output reaches only
the *inputs* of other weight layers, through ops that keep each unit in its place: element-wise
activations, dropout, a bias add or scale by a constant per-unit vector (cut too), batch norm (its
parameters and statistics cut too), pooling, and a flatten of ``[N, C, 1, 1]`` to ``[N, C]``. Anything
else (a model output, a residual add, a reshape that mixes units, a concat, a softmax) pins the units,
and the layer is reported with the reason. Works on the graphs of the ONNX importer (``F.linear``,
``torch.conv2d``, …) and of ``torch.export`` (``aten.linear.default``, ``aten.conv2d.default``, …).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx

from maas.compression.graph_module import get_tensor, shapes
from maas.compression.onnx_import.kernels import global_max, global_mean

aten = torch.ops.aten

LINEAR: set[Any] = {F.linear, aten.linear.default}
MATMUL: set[Any] = {torch.matmul, aten.matmul.default, aten.mm.default}
CONV: set[Any] = {F.conv1d, F.conv2d, F.conv3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_UNARY: set[Any] = {
    torch.relu, F.relu, aten.relu.default, torch.sigmoid, aten.sigmoid.default, torch.tanh, aten.tanh.default,
    F.gelu, aten.gelu.default, F.leaky_relu, aten.leaky_relu.default, F.elu, aten.elu.default, F.silu,
    aten.silu.default, F.hardtanh, aten.hardtanh.default, torch.clamp, aten.clamp.default, F.softplus,
    aten.softplus.default, F.dropout, aten.dropout.default, aten.clone.default, aten.alias.default,
}  # fmt: skip
_BINARY: set[Any] = {
    torch.add, torch.sub, torch.mul, torch.div, operator.add, operator.sub, operator.mul, operator.truediv,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
}  # fmt: skip
#: Batch norms: the input first, then four per-channel tensors at positions 1-4 (in either order).
_BATCH_NORM: set[Any] = {F.batch_norm, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_POOL: set[Any] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool2d,
    aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.mean.dim, torch.mean,
    aten.amax.default, torch.amax, aten.max_pool2d_with_indices.default, global_mean, global_max,
}  # fmt: skip
_FLATTEN: set[Any] = {
    torch.flatten, aten.flatten.using_ints, torch.reshape, aten.view.default, aten.reshape.default,
    torch.squeeze, aten.squeeze.dims, aten.squeeze.dim,
}  # fmt: skip
_RESHAPE: set[Any] = {torch.reshape, aten.view.default, aten.reshape.default}
#: Ops that return a tuple whose item 0 is the tensor that carries the units.
_TUPLE_OUT: set[Any] = {aten._native_batch_norm_legit_no_training.default, aten.max_pool2d_with_indices.default}


@dataclass(frozen=True)
class Cut:
    """Keep only the chosen units of ``target`` along ``dim``."""

    target: str
    dim: int


@dataclass
class Layer:
    name: str
    #: ``neurons`` (linear, matmul) or ``channels`` (conv).
    kind: Literal["neurons", "channels"]
    node: fx.Node
    weight: str
    #: The weight's dimension that holds the units (0 for linear and conv, 1 for a ``x @ W`` matmul).
    unit_dim: int
    units: int
    cuts: list[Cut] = field(default_factory=list)
    #: (reshape node, position in its shape argument) to set to the new width.
    edits: list[tuple[fx.Node, int]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    #: Why the layer cannot be pruned; None when it can.
    reason: str | None = None


def _op_name(target: Any) -> str:
    return str(getattr(target, "__name__", target))


def layer_name(weight_target: str) -> str:
    return weight_target.removesuffix(".weight")


class _Analysis:
    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
        self.gm = gm
        self.shapes = shapes(gm, example_inputs)
        self.attr_uses: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self.attr_uses[node.target] = self.attr_uses.get(node.target, 0) + len(node.users)

    def weight_of(self, node: fx.Node) -> tuple[str, Literal["neurons", "channels"], int] | None:
        """(weight target, kind, unit dim) when ``node`` is a weight layer applied to an activation."""
        if node.op != "call_function" or len(node.args) < 2:
            return None
        w = node.args[1]
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            return None
        if node.target in LINEAR:
            return str(w.target), "neurons", 0
        if node.target in MATMUL and get_tensor(self.gm, str(w.target)).dim() == 2:
            return str(w.target), "neurons", 1
        if node.target in CONV:
            return str(w.target), "channels", 0
        return None

    def owned(self, node: Any) -> str | None:
        """The target of a get_attr node used exactly once in the whole graph, else None."""
        if isinstance(node, fx.Node) and node.op == "get_attr" and self.attr_uses.get(str(node.target)) == 1:
            return str(node.target)
        return None

    def layers(self) -> list[Layer]:
        found = []
        for node in self.gm.graph.nodes:
            info = self.weight_of(node)
            if info is None:
                continue
            target, kind, unit_dim = info
            units = get_tensor(self.gm, target).shape[unit_dim]
            layer = Layer(layer_name(target), kind, node, target, unit_dim, units)
            layer.reason = self._producer(layer) or self._follow(layer)
            found.append(layer)
        return found

    def _producer(self, layer: Layer) -> str | None:
        node = layer.node
        if self.owned(node.args[1]) is None:
            return "its weight is shared with another op"
        layer.cuts.append(Cut(layer.weight, layer.unit_dim))
        if layer.kind == "channels" and _conv_groups(node) != 1:
            return "it is a grouped (or depthwise) convolution"
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None:
            target = self.owned(bias)
            if target is None:
                return "its bias is not a parameter of its own"
            layer.cuts.append(Cut(target, 0))
        if node not in self.shapes:
            return "its output shape is unknown"
        return None

    def _follow(self, layer: Layer) -> str | None:
        rank = len(self.shapes[layer.node])
        todo = [(layer.node, rank - 1 if layer.kind == "neurons" else 1)]
        while todo:
            value, axis = todo.pop()
            for user in value.users:
                why = self._visit(layer, value, axis, user, todo)
                if why:
                    return why
        return None if layer.consumers else "its output reaches no other weight layer"

    def _visit(
        self, layer: Layer, value: fx.Node, axis: int, user: fx.Node, todo: list[tuple[fx.Node, int]]
    ) -> str | None:
        if user.op == "output":
            return "its output is a model output"
        if user.op != "call_function":
            return f"its output reaches {user.op} {user.target!r}"
        target, shape = user.target, self.shapes.get(user)
        where = f"{user.name} ({_op_name(target)})"
        if target is operator.getitem:
            return f"its output is indexed by {where}"
        others = [a for a in (*user.args[1:], *user.kwargs.values()) if isinstance(a, fx.Node)]
        if target in _UNARY and user.args[0] is value and not others:
            todo.append((user, axis))
        elif target in _BINARY:
            other = user.args[1] if user.args[0] is value else user.args[0]
            why = self._per_unit_constant(layer, other, axis, len(self.shapes[value]))
            if why:
                return f"{where}: {why}"
            todo.append((user, axis))
        elif target in _BATCH_NORM and user.args[0] is value and axis == 1:
            for stat in user.args[1:5]:
                if stat is not None:
                    owner = self.owned(stat)
                    if owner is None:
                        return f"{where}: its batch-norm tensors are shared"
                    layer.cuts.append(Cut(owner, 0))
            self._through(user, axis, todo)
        elif target in _POOL and user.args[0] is value:
            if shape is None or len(shape) != len(self.shapes[value]) or shape[axis] != layer.units:
                return f"its units are reduced by {where}"
            self._through(user, axis, todo)
        elif target in _FLATTEN and user.args[0] is value:
            why = self._flatten(layer, value, axis, user)
            if why:
                return f"{where}: {why}"
            todo.append((user, 1))
        elif self._consume(layer, value, axis, user):
            layer.consumers.append(layer_name(str(user.args[1].target)))  # type: ignore[union-attr]
        else:
            return f"its output reaches {where}, which needs every unit in place (a residual add, reshape, concat, …)"
        return None

    def _through(self, user: fx.Node, axis: int, todo: list[tuple[fx.Node, int]]) -> None:
        if user.target in _TUPLE_OUT:
            todo.extend((g, axis) for g in user.users if g.target is operator.getitem and g.args[1] == 0)
        else:
            todo.append((user, axis))

    def _per_unit_constant(self, layer: Layer, other: Any, axis: int, rank: int) -> str | None:
        if not isinstance(other, fx.Node):
            return None  # a Python number
        if other.op != "get_attr":
            return "it meets another tensor there (a residual connection or a gate), which pins the units"
        tensor = get_tensor(self.gm, str(other.target))
        if tensor.numel() == 1:
            return None
        pos = axis - (rank - tensor.dim())
        if pos < 0 or any(d != 1 for i, d in enumerate(tensor.shape) if i != pos):
            return f"the constant {other.target} mixes units"
        if tensor.shape[pos] == 1:
            return None
        target = self.owned(other)
        if tensor.shape[pos] != layer.units or target is None:
            return f"the constant {other.target} does not belong to this layer alone"
        layer.cuts.append(Cut(target, pos))
        return None

    def _flatten(self, layer: Layer, value: fx.Node, axis: int, user: fx.Node) -> str | None:
        before, after = self.shapes[value], self.shapes.get(user)
        if axis != 1 or after is None or len(after) != 2 or after[1] != layer.units:
            return "it reshapes the units"
        if any(d != 1 for i, d in enumerate(before) if i not in (0, 1)):
            return "it flattens spatial positions into the units"
        size = user.args[1] if len(user.args) > 1 else None
        if isinstance(size, list | tuple) and len(size) == 2 and user.target in _RESHAPE:
            if size[1] == layer.units:
                layer.edits.append((user, 1))
            elif size[1] != -1:
                return "its target shape is computed, not a constant"
        return None

    def _consume(self, layer: Layer, value: fx.Node, axis: int, user: fx.Node) -> bool:
        info = self.weight_of(user)
        if info is None or user.args[0] is not value or value in user.args[1:]:
            return False
        target, kind, unit_dim = info
        if self.owned(user.args[1]) is None:
            return False
        rank = len(self.shapes[value])
        if kind == "neurons" and axis == rank - 1:
            layer.cuts.append(Cut(target, 1 - unit_dim))
            return True
        if kind == "channels" and axis == 1 and _conv_groups(user) == 1:
            layer.cuts.append(Cut(target, 1))
            return True
        return False


def _conv_groups(node: fx.Node) -> int:
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return int(groups) if isinstance(groups, int) else -1


def find_layers(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> list[Layer]:
    """Every weight layer of ``gm`` in graph order, each with its cuts, or the reason it cannot be pruned."""
    return _Analysis(gm, example_inputs).layers()


def weight_layers(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(layer name, weight target) of every linear, matmul-by-weight and conv layer, for unstructured pruning."""
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR | MATMUL | CONV and len(node.args) > 1:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr" and get_tensor(gm, str(w.target)).dim() >= 2:
                found.setdefault(layer_name(str(w.target)), str(w.target))
    return list(found.items())
