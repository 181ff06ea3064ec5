"""The single-process training loop of compression: fine-tuning after pruning, and distillation.

:func:`fit` runs ``spec.steps`` optimizer steps over batches drawn in a seeded order (a fresh permutation
of the dataset per epoch, from ``spec.seed``), so two runs with the same spec give the same model. The
default loss is cross-entropy on one output, which may hold logits or probabilities (a served classifier
returns softmax probabilities): :func:`output_kind` tells which from the first batch, and
:func:`log_probs` turns either into log-probabilities, at a temperature for soft targets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from maas.compression.candidate import Progress
from maas.compression.recipe import DatasetSpec, TrainSpec
from maas.errors import InvalidInput
from maas.imports import resolve
from maas.training.components import build_optimizer
from maas.training.config import OptimizerConfig
from maas.training.data import gather

logger = logging.getLogger(__name__)

OutputKind = Literal["logits", "probabilities"]
#: ``loss(outputs, x, y, batch_indices)``: ``outputs`` is what the model returned (a tensor or a tuple), ``y``
#: is None for datasets of inputs alone, ``batch_indices`` are the dataset indices of the batch.
LossFn = Callable[[Any, Any, Any, torch.Tensor], torch.Tensor]


def load_dataset(spec: DatasetSpec) -> Any:
    """Call the spec's dataset factory with its kwargs; the result must be a sized, indexable dataset."""
    factory = resolve(spec.dataset, "dataset")
    try:
        dataset = factory(**spec.kwargs)
    except TypeError as exc:
        raise InvalidInput(f"dataset {spec.dataset!r} cannot be called with kwargs {spec.kwargs}: {exc}") from exc
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise InvalidInput(
            f"dataset {spec.dataset!r} returned a {type(dataset).__name__}; it must return a map-style dataset "
            "(len() and [i]), e.g. a torch TensorDataset of (input, label) or a list"
        )
    if len(dataset) == 0:
        raise InvalidInput(f"dataset {spec.dataset!r} is empty")
    return dataset


def output_kind(output: torch.Tensor) -> OutputKind:
    """``probabilities`` when every row is non-negative and sums to 1 (within 1e-3), else ``logits``."""
    out = output.detach().float()
    if out.dim() == 0 or out.shape[-1] < 2 or not bool((out >= 0).all()):
        return "logits"
    return "probabilities" if bool(((out.sum(dim=-1) - 1).abs() <= 1e-3).all()) else "logits"


def log_probs(output: torch.Tensor, kind: OutputKind, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities over the last dimension, softened by ``temperature`` (softmax(logits / T)).

    Probabilities are read as logits up to a constant (``log p``), so both kinds give the same soft targets.
    """
    logits = output.float() if kind == "logits" else torch.log(output.float().clamp_min(1e-12))
    if kind == "probabilities" and temperature == 1.0:
        return logits
    return F.log_softmax(logits / temperature, dim=-1)


def select_output(outputs: Any, index: int) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        if index != 0:
            raise InvalidInput(f"the model returns one output; output index {index} does not exist")
        return outputs
    items = list(outputs)
    if not 0 <= index < len(items):
        raise InvalidInput(f"the model returns {len(items)} outputs; output index {index} does not exist")
    return items[index]  # type: ignore[no-any-return]


def set_training(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, for modules that allow it (``torch.export`` modules refuse it; their
    dropout and batch norm were fixed in eval mode when exported)."""
    try:
        model.train(training)
    except NotImplementedError:
        pass


def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - size + 1, size):  # whole batches only: a 1-sample tail would be noisy
            yield perm[i : i + size]


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _to(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    return value


def default_loss(output: torch.Tensor, y: Any, kind: OutputKind) -> torch.Tensor:
    if y is None:
        raise InvalidInput("the dataset has no labels; the default loss (cross-entropy) needs (input, label) pairs")
    if kind == "probabilities":
        return F.nll_loss(log_probs(output, kind).reshape(-1, output.shape[-1]), y.reshape(-1).long())
    return F.cross_entropy(output.float().reshape(-1, output.shape[-1]), y.reshape(-1).long())


def fit(
    model: nn.Module,
    dataset: Any,
    spec: TrainSpec,
    *,
    loss: LossFn | None = None,
    output_index: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
    after_step: Callable[[int], None] | None = None,
    description: str = "training",
) -> nn.Module:
    """Train ``model`` in place for ``spec.steps`` steps and return it, in eval mode, on ``device``.

    The inputs of a batch are passed as ``model(x)`` (``model(*x)`` when the dataset yields a tuple of
    inputs). ``progress(description, done, total)`` is called about a hundred times; ``after_step(step)``
    runs after every optimizer step (pruning uses it to keep zeros at zero).
    """
    n = len(dataset)
    if n == 0:
        raise InvalidInput("the training dataset is empty")
    torch.manual_seed(spec.seed)
    model.to(device)
    set_training(model, True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidInput("the model has no trainable parameters")
    optimizer = build_optimizer(
        OptimizerConfig(name=spec.optimizer, lr=spec.lr, weight_decay=spec.weight_decay), params
    )
    kind: OutputKind | None = None
    batches = _batches(n, spec.batch_size, spec.seed)
    every = max(1, spec.steps // 100)
    value = torch.zeros(())
    for step in range(spec.steps):
        idx = next(batches)
        x, y = _split(gather(dataset, idx))
        x, y = _to(x, device), _to(y, device)
        outputs = model(*x) if isinstance(x, list | tuple) else model(x)
        if loss is not None:
            value = loss(outputs, x, y, idx)
        else:
            out = select_output(outputs, output_index)
            kind = kind or output_kind(out)
            value = default_loss(out, y, kind)
        optimizer.zero_grad(set_to_none=True)
        value.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward has no annotations
        optimizer.step()
        if after_step is not None:
            after_step(step)
        if progress is not None and ((step + 1) % every == 0 or step + 1 == spec.steps):
            progress(description, step + 1, spec.steps)
    logger.info("trained %d steps; last loss %.4f", spec.steps, value.item())
    set_training(model, False)
    return model
