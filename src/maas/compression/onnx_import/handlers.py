"""What every ONNX op handler shares: its type, how handlers are registered, and reading a node's inputs.

A handler reads its node's inputs from the :class:`~maas.compression.onnx_import.builder.Builder` and
writes the torch call that computes the node (a plain ``torch`` / ``torch.nn.functional`` function wherever
one matches, so that graph passes such as pruning recognise ``F.linear`` and ``F.conv2d``). Each handler
module keeps its own table; :mod:`maas.compression.onnx_import.importer` joins them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
from torch import fx

from maas.compression.onnx_import.builder import Builder
from maas.errors import InvalidInput

#: (builder, node, attributes) -> the node's value, or a tuple of values for several outputs.
Handler = Callable[[Builder, onnx.NodeProto, dict[str, Any]], Any]


def registrar(table: dict[str, Handler]) -> Callable[..., Callable[[Handler], Handler]]:
    """A decorator factory, ``@op("Relu", "Tanh")``, that enters the decorated handler in ``table``."""

    def op(*names: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            for name in names:
                table[name] = fn
            return fn

        return register

    return op


def unsupported(b: Builder, node: onnx.NodeProto, why: str) -> InvalidInput:
    return InvalidInput(
        f"{b.source}: node {node.name or node.output[0]!r} ({node.op_type}) {why}; the ONNX importer cannot convert "
        "it. Register the model as torch_export (a .pt2 written by torch.export) to compress it"
    )


def tensor_inputs(b: Builder, node: onnx.NodeProto) -> list[Any]:
    return [b.tensor(n) for n in node.input]


def static(b: Builder, node: onnx.NodeProto, index: int, what: str) -> Any:
    """An input that must be known when importing (axes, pads, a constant shape)."""
    if index >= len(node.input) or not node.input[index]:
        return None
    value = b.value(node.input[index])
    if isinstance(value, fx.Node):
        raise unsupported(b, node, f"takes its {what} from a computed tensor, not a constant")
    return value
