"""Fuse the attention blocks that torch's ONNX exporter writes into ONNX Runtime's ``MultiHeadAttention``.

The dynamo exporter decomposes each ``scaled_dot_product_attention`` into about twenty nodes: per-head
Reshape/Transpose of Q, K and V, a square-root scale on both Q and K, ``MatMul``, the mask ``Add``,
``Softmax`` with an ``IsNaN``/``Where`` guard, ``MatMul`` with V, and Transpose/Reshape back. ORT's
transformer optimizer does not recognise that pattern. In an int8 model the integer MatMuls are fast, and
these small memory-bound nodes become a large share of the time, so the quantize step replaces each block
with one ``com.microsoft.MultiHeadAttention`` (inputs ``[batch, sequence, hidden]``, the mask passed as
``attention_bias``). The result is the same except for a sequence whose every key is masked, which SDPA
turns into zeros and MultiHeadAttention into a uniform average; a tokenizer never produces one.

Only blocks whose every piece matches (shapes known from the graph's value info) are fused; anything else
is left alone. Callers check the fused model's outputs against the original's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

_MS_DOMAIN = "com.microsoft"


@dataclass
class _Graph:
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    consts: dict[str, np.ndarray]
    shapes: dict[str, list[int | str]]

    def node(self, name: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def only_consumer(self, name: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def scalar(self, name: str) -> float | None:
        value = self.consts.get(name)
        return float(value.reshape(())) if value is not None and value.size == 1 else None


def _read(model: onnx.ModelProto) -> _Graph:
    producer, consumers = {}, defaultdict(list)
    consts = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        for out in node.output:
            producer[out] = node
        for name in node.input:
            consumers[name].append(node)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    shapes = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [
                d.dim_value if d.dim_value > 0 else d.dim_param for d in value.type.tensor_type.shape.dim
            ]
    return _Graph(producer, dict(consumers), consts, shapes)


def _perm(node: onnx.NodeProto | None) -> list[int] | None:
    if node is None:
        return None
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _heads(g: _Graph, name: str) -> str | None:
    """The ``[batch, sequence, hidden]`` tensor that ``name`` (``[batch, heads, sequence, head_dim]``) splits."""
    transpose = g.node(name, "Transpose")
    if _perm(transpose) != [0, 2, 1, 3]:
        return None
    assert transpose is not None
    reshape = g.node(transpose.input[0], "Reshape")
    if reshape is None or len(g.shapes.get(reshape.input[0], [])) != 3:
        return None
    return str(reshape.input[0])


def _key(g: _Graph, name: str) -> str | None:
    """K split into heads, from K transposed for ``Q @ K^T`` (directly, or via the exporter's 3-D detour)."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "Transpose" and _perm(node) == [0, 1, 3, 2]:
        return _heads(g, node.input[0])
    outer = g.node(name, "Reshape")
    transpose = g.node(outer.input[0], "Transpose") if outer is not None else None
    inner = g.node(transpose.input[0], "Reshape") if transpose is not None and _perm(transpose) == [0, 2, 1] else None
    return _heads(g, inner.input[0]) if inner is not None else None


def _scaled(g: _Graph, name: str) -> tuple[str, float] | None:
    node = g.node(name, "Mul")
    if node is None:
        return None
    for value, factor in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        scale = g.scalar(factor)
        if scale is not None:
            return value, scale
    return None


def _match(g: _Graph, softmax: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(the final Reshape to replace, the MultiHeadAttention node computing its output) for one block."""
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    add = g.node(softmax.input[0], "Add")
    if axis not in (-1, 3) or add is None:
        return None
    scores = bias = None
    for a, b in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        if g.node(a, "MatMul") is not None and len(g.shapes.get(b, [])) == 4:
            scores, bias = g.node(a, "MatMul"), b
            break
    if scores is None or bias is None:
        return None
    q, k = _scaled(g, scores.input[0]), _scaled(g, scores.input[1])
    if q is None or k is None:
        return None
    q_lin, k_lin = _heads(g, q[0]), _key(g, k[0])
    probs = softmax.output[0]
    isnan = next((n for n in g.consumers.get(probs, []) if n.op_type == "IsNaN"), None)
    if isnan is not None:  # SDPA's guard for rows with every key masked
        guard = g.only_consumer(isnan.output[0], "Where")
        if guard is None or guard.input[2] != probs or g.scalar(guard.input[1]) != 0.0:
            return None
        probs = guard.output[0]
    pv = g.only_consumer(probs, "MatMul")
    if pv is None or pv.input[0] != probs:
        return None
    v_lin = _heads(g, pv.input[1])
    back = g.only_consumer(pv.output[0], "Transpose")
    out = g.only_consumer(back.output[0], "Reshape") if back is not None and _perm(back) == [0, 2, 1, 3] else None
    head_shape = g.shapes.get(q[0], [])
    if None in (q_lin, k_lin, v_lin, out) or len(head_shape) != 4:
        return None
    heads, head_dim = head_shape[1], head_shape[3]
    assert out is not None and q_lin is not None and k_lin is not None and v_lin is not None
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    hidden = heads * head_dim
    if any(g.shapes.get(t, [None])[-1] != hidden for t in (q_lin, k_lin, v_lin, out.output[0])):
        return None
    mha = helper.make_node(
        "MultiHeadAttention",
        [q_lin, k_lin, v_lin, "", "", bias],
        [out.output[0]],
        name=f"{softmax.name or out.output[0]}_mha",
        domain=_MS_DOMAIN,
        num_heads=heads,
        scale=q[1] * k[1],
    )
    return out, mha


def fuse_attention(model: onnx.ModelProto) -> int:
    """Replace every matching attention block in ``model`` (in place); returns how many were fused."""
    g = _read(model)
    swaps = {}
    for node in model.graph.node:
        if node.op_type == "Softmax":
            found = _match(g, node)
            if found is not None:
                swaps[id(found[0])] = found[1]
    if not swaps:
        return 0
    nodes = [swaps.get(id(node), node) for node in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(_live(nodes, {o.name for o in model.graph.output}))
    if not any(op.domain == _MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return len(swaps)


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose results nothing uses (walked backwards, so whole dead chains go)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]
