"""Any torch candidate as a plain, trainable, exportable ``fx.GraphModule`` that owns its weights.

Graph passes (pruning) need a graph. Three kinds of module reach them: the importer's modules (already
graphs), ``torch.export.load(...).module()`` (a graph, but one that refuses ``.train()``/``.eval()``, so
neither fine-tuning nor :func:`maas.runtimes.export.export` can use it as it is, and that carries a
``_guards_fn`` input check), and ordinary ``nn.Module``s, which are traced with ``torch.export`` (in eval
mode: dropout and batch-norm statistics are frozen in the graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from maas.errors import InvalidInput


def as_graph_module(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """A new ``GraphModule`` computing what ``module`` computes, with its own copies of every parameter and
    buffer (changing or training it never touches ``module``)."""
    if not isinstance(module, fx.GraphModule):
        plain, was_training = module, module.training
        plain.eval()
        try:
            module = torch.export.export(plain, tuple(example_inputs)).module()
        except Exception as exc:
            raise InvalidInput(
                f"torch.export cannot trace the model ({type(exc).__name__}: {exc}); a graph is needed to find "
                "prunable layers. Export it yourself with torch.export and register the .pt2"
            ) from exc
        finally:
            plain.train(was_training)
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(module.graph, values)
    graph.output(out)
    # torch.export graphs return a flat list that their pytree codegen turns back into the user's structure
    # (a tensor, a tuple, …); keep it (deep-copying it warns about torch's own deprecated pytree API).
    graph._codegen = module.graph._codegen
    for node in list(graph.nodes):
        # torch.export's input check (shapes and dtypes of the original program): not part of the computation.
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        else:
            node.meta = {}  # shapes and stack traces of the source program, stale once the graph is changed
    gm = fx.GraphModule(module, graph)
    for name, param in list(gm.named_parameters()):
        set_tensor(gm, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
    for name, buf in list(gm.named_buffers()):
        set_tensor(gm, name, buf.detach().clone())
    return gm


def set_tensor(root: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer at ``target`` (a dotted name), keeping its kind."""
    owner_name, _, attr = target.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if attr in owner._parameters:
        old = owner._parameters[attr]
        keep_grad = old.requires_grad if old is not None else True
        owner._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, keep_grad)
    elif attr in owner._buffers:
        owner._buffers[attr] = value.detach()
    else:
        raise KeyError(f"{target} is neither a parameter nor a buffer")


def get_tensor(root: nn.Module, target: str) -> torch.Tensor:
    owner_name, _, attr = target.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    value = getattr(owner, attr)
    if not isinstance(value, torch.Tensor):
        raise KeyError(f"{target} is not a tensor")
    return value


def shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> dict[fx.Node, tuple[int, ...]]:
    """The output shape of every node that yields one tensor, from one run on ``example_inputs``."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    found: dict[fx.Node, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        meta: Any = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            found[node] = tuple(meta.shape)
    return found
