"""Neurons and channels (structured) or single weights (unstructured) pruned from a torch graph.

Structured pruning ranks the units of each prunable layer (:mod:`maas.compression.steps.prune.graph`) by
the L2 norm of their weights, keeps the strongest ``1 - amount``, and rebuilds every tensor that touches
them at its smaller shape (the layer's rows and bias, a following batch norm, the next layer's columns), so
the saved model is smaller and faster. Unstructured pruning zeroes the smallest weights of every linear and
conv layer; shapes stay, so neither the file nor dense kernels get any smaller or faster. The parent's
module is never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx

from maas.compression.candidate import Candidate, StepContext, example_tensors, to_torch
from maas.compression.graph_module import as_graph_module, get_tensor, set_tensor
from maas.compression.recipe import PruneStep, TrainSpec
from maas.compression.steps.prune.graph import Layer, find_layers, weight_layers
from maas.compression.tuning import fit, load_dataset
from maas.errors import InvalidInput

_FLOAT = ("FP16", "BF16", "FP32", "FP64")


def apply(step: PruneStep, cand: Candidate, ctx: StepContext) -> Candidate:
    """A new ``torch`` candidate: ``cand`` pruned (and fine-tuned when ``step.finetune`` is set)."""
    if cand.kind == "hf":
        raise InvalidInput(
            "a Hugging Face model can only lose attention heads here (method: structured, target: heads); "
            "to prune neurons, export it to ONNX or torch_export first and register that"
        )
    if step.target == "heads":
        raise InvalidInput("target 'heads' is for structured pruning of Hugging Face models; use method: structured")
    base = to_torch(cand, ctx, why="prune")
    examples = example_tensors(ctx, base.signature)
    assert base.module is not None
    gm = as_graph_module(base.module, examples)
    child = base.evolve(kind="torch", module=gm, path=None)
    masks: dict[str, torch.Tensor] = {}
    if step.method == "structured":
        child.history.append(_structured(step, gm, examples, child.notes))
    else:
        masks = _unstructured(step, gm)
        zeros = sum(int((m == 0).sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        child.history.append(
            f"prune unstructured {step.scope} {step.amount:.0%}: {zeros}/{total} weights zero in {len(masks)} layers"
        )
        child.notes.append(
            f"unstructured pruning left {zeros / total:.1%} of the linear/conv weights at zero; the file keeps its "
            "size and dense kernels run no faster (use method: structured to shrink and speed up the model)"
        )
    if step.finetune is not None:
        _finetune(step.finetune, gm, child, ctx, masks)
    return child


def _structured(step: PruneStep, gm: fx.GraphModule, examples: Sequence[torch.Tensor], notes: list[str]) -> str:
    layers = find_layers(gm, examples)
    chosen = _choose(step, layers)
    skipped = [f"{layer.name} ({layer.reason})" for layer in layers if layer.kind == step.target and layer.reason]
    if skipped and step.layers is None:
        notes.append(f"structured pruning left these layers whole: {'; '.join(skipped)}")
    widths = shrink(gm, chosen, step.amount)
    with torch.no_grad():
        gm(*examples)  # the rebuilt graph must still run
    done = ", ".join(f"{old}->{new} in {name}" for name, old, new in widths)
    return f"prune structured {step.target} {step.amount:.0%}: {done}"


def _choose(step: PruneStep, layers: list[Layer]) -> list[Layer]:
    other = "channels" if step.target == "neurons" else "neurons"
    if step.layers is None:
        chosen = [layer for layer in layers if layer.kind == step.target and layer.reason is None]
        if not chosen:
            found = "; ".join(f"{layer.name} ({layer.kind}): {layer.reason or 'prunable'}" for layer in layers)
            raise InvalidInput(
                f"no layer of this model can lose {step.target}: {found or 'it has no linear or conv layers'}. "
                f"Check target ({other}?) or prune a model whose hidden layers feed only other layers"
            )
        return chosen
    by_name = {layer.name: layer for layer in layers}
    chosen = []
    for name in step.layers:
        layer = by_name.get(name)
        if layer is None:
            raise InvalidInput(f"layers: the model has no weight layer {name!r}; its layers are {', '.join(by_name)}")
        if layer.kind != step.target:
            raise InvalidInput(f"layers: {name!r} holds {layer.kind}, not {step.target}; set target: {layer.kind}")
        if layer.reason:
            raise InvalidInput(f"layers: {name!r} cannot be pruned: {layer.reason}. Remove it from layers")
        chosen.append(layer)
    return chosen


def shrink(gm: fx.GraphModule, layers: Sequence[Layer], amount: float) -> list[tuple[str, int, int]]:
    """Keep the ``1 - amount`` strongest units of each layer; returns (name, units before, after)."""
    keeps = []
    for layer in layers:
        weight = get_tensor(gm, layer.weight).detach()
        norms = weight.movedim(layer.unit_dim, 0).reshape(layer.units, -1).norm(dim=1)
        count = max(1, round(layer.units * (1 - amount)))
        keeps.append(torch.topk(norms, count).indices.sort().values)
    for layer, keep in zip(layers, keeps, strict=True):
        for cut in layer.cuts:
            tensor = get_tensor(gm, cut.target).detach()
            set_tensor(gm, cut.target, tensor.index_select(cut.dim, keep.to(tensor.device)).clone())
        for node, pos in layer.edits:
            size = list(node.args[1])  # type: ignore[arg-type]
            size[pos] = len(keep)
            node.args = (node.args[0], size, *node.args[2:])
    gm.recompile()
    return [(layer.name, layer.units, len(keep)) for layer, keep in zip(layers, keeps, strict=True)]


def _unstructured(step: PruneStep, gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Zero the smallest weights; returns the masks (weight target -> 0/1 tensor)."""
    layers = dict(weight_layers(gm))
    if step.layers is not None:
        unknown = [name for name in step.layers if name not in layers]
        if unknown:
            raise InvalidInput(f"layers: the model has no weight layer {unknown}; its layers are {', '.join(layers)}")
        layers = {name: layers[name] for name in step.layers}
    if not layers:
        raise InvalidInput("the model has no linear or conv weights to prune")
    weights = {target: get_tensor(gm, target).detach() for target in layers.values()}
    if step.scope == "global":
        flat = torch.cat([w.abs().flatten().float() for w in weights.values()])
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[torch.topk(flat, round(step.amount * flat.numel()), largest=False).indices] = True
        parts = torch.split(drop, [w.numel() for w in weights.values()])
        masks = {t: (~p).reshape(w.shape).to(w.dtype) for (t, w), p in zip(weights.items(), parts, strict=True)}
    else:
        masks = {}
        for target, w in weights.items():
            drop = torch.zeros(w.numel(), dtype=torch.bool)
            drop[torch.topk(w.abs().flatten(), round(step.amount * w.numel()), largest=False).indices] = True
            masks[target] = (~drop).reshape(w.shape).to(w.dtype)
    _apply_masks(gm, masks)
    return masks


def _apply_masks(gm: fx.GraphModule, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for target, mask in masks.items():
            weight = get_tensor(gm, target)
            weight.mul_(mask.to(weight.device))


def _finetune(
    spec: TrainSpec, gm: fx.GraphModule, child: Candidate, ctx: StepContext, masks: dict[str, torch.Tensor]
) -> None:
    index = next((i for i, s in enumerate(child.signature.outputs) if s.datatype in _FLOAT), None)
    if index is None:
        raise InvalidInput("finetune needs a floating-point output (logits or probabilities); the model has none")
    keep_zeros: Callable[[int], None] | None = (lambda _step: _apply_masks(gm, masks)) if masks else None
    fit(
        gm,
        load_dataset(spec),
        spec,
        output_index=index,
        device=ctx.device,
        progress=ctx.progress,
        after_step=keep_zeros,
        description="fine-tuning",
    )
    gm.cpu()
    child.history[-1] += f"; fine-tuned {spec.steps} steps on {spec.dataset}"
