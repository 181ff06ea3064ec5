""":func:`import_onnx`: an ONNX file as an ``fx.GraphModule``, one torch call per ONNX node."""

from __future__ import annotations

from pathlib import Path

import onnx
from torch import fx, nn

from maas.compression.onnx_import import elementwise_ops, layer_ops, shape_ops
from maas.compression.onnx_import.builder import Builder, attr_name
from maas.compression.onnx_import.handlers import Handler
from maas.errors import InvalidInput

#: ONNX op type -> the handler writing its torch call.
OPS: dict[str, Handler] = {**elementwise_ops.OPS, **layer_ops.OPS, **shape_ops.OPS}


def import_onnx(path: Path) -> nn.Module:
    """The ONNX model at ``path`` as an ``fx.GraphModule``: ``forward`` takes the graph inputs in order and
    returns the outputs in order (a tuple when there are several). Raises ``InvalidInput`` naming the
    first unsupported op."""
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise InvalidInput(f"{path.name} is not a readable ONNX model: {exc}") from exc
    b = Builder(model, path.name)
    for inp in model.graph.input:
        if inp.name in b.initializers:  # IR < 4 lists initializers among the inputs
            continue
        b.env[inp.name] = b.graph.placeholder(attr_name(inp.name))
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            raise InvalidInput(
                f"{path.name}: ONNX op {op!r} (node {node.name or node.output[0]!r}) is not supported by the "
                f"ONNX importer that pruning and distillation use (it supports {', '.join(sorted(OPS))}); "
                "register the model as torch_export (a .pt2 written by torch.export) to compress it"
            )
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        results = OPS[node.op_type](b, node, attrs)
        if not isinstance(results, tuple):
            results = (results,)
        kept = [o for o in node.output if o]
        if len(kept) > len(results):
            raise InvalidInput(
                f"{path.name}: node {node.name!r} ({node.op_type}) uses output(s) {kept[len(results) :]} that the "
                "importer does not produce (e.g. a training-mode mask or indices); re-export the model for inference"
            )
        for name, value in zip(node.output, results, strict=False):
            if name:
                b.env[name] = value
    outputs = [b.tensor(o.name) for o in model.graph.output]
    b.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    module = fx.GraphModule(b.root, b.graph, class_name="OnnxModule")
    module.eval()
    return module
