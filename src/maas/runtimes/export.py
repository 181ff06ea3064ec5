"""Export a ``torch.nn.Module`` to the formats maas serves: ONNX and ``torch.export`` (``.pt2``).

The model is traced once with ``torch.export``; the ONNX file is converted from that same program, so
both artifacts hold the same graph. Dimension 0 of every input is a dynamic batch dimension unless
``dynamic_batch=False``.

Public API: :func:`export` (a module to ``.onnx`` and/or ``.pt2`` files), :class:`ClassifierHead` (the
head exported in front of classifiers) and ``FORMATS`` (the format names :func:`export` writes).
Importing this module imports torch.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from maas.errors import InvalidInput
from maas.runtimes.torch_export import NAMES_FILE

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torch_export")
_SUFFIX = {"onnx": ".onnx", "torch_export": ".pt2"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ClassifierHead(torch.nn.Module):
    """Serve a logits model as (probabilities, label): the head exported in front of classifiers."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return torch.softmax(logits, dim=-1), torch.argmax(logits, dim=-1)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it only once the body has written it completely."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


@contextlib.contextmanager
def quiet_onnx_exporter() -> Iterator[None]:
    """Silence the ONNX exporter's noise that is not about the user's model (also used by
    :mod:`maas.runtimes.hf.export`)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _DropTorchvisionNotice()
    registration.addFilter(notice)
    try:
        with warnings.catch_warnings():
            # torch's own pytree deprecation, raised inside the exporter's decomposition step.
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registration.removeFilter(notice)


def _default_input_names(model: torch.nn.Module, count: int) -> list[str]:
    params = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) >= count:
        return [p.name for p in params[:count]]
    return [f"input_{i}" for i in range(count)]


def _check_names(kind: str, names: Sequence[str], count: int) -> list[str]:
    names = list(names)
    if len(names) != count:
        raise InvalidInput(f"{kind} has {len(names)} names but the model has {count}: {names}")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise InvalidInput(f"{kind} must be distinct, non-empty strings, got {names}")
    return names


def _batched(example_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    if any(t.dim() == 0 for t in example_inputs):
        raise InvalidInput("dynamic_batch needs every example input to have a batch dimension (dim 0)")
    batches = {t.shape[0] for t in example_inputs}
    if len(batches) != 1:
        raise InvalidInput(f"example inputs disagree on the batch size (dim 0): {sorted(batches)}")
    if batches.pop() != 1:
        return example_inputs
    # torch.export specializes dimensions of size 1 (and 0), so a batch of 1 would freeze the batch size.
    return tuple(torch.cat([t, t]) for t in example_inputs)


def export(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    out_dir: Path,
    *,
    name: str = "model",
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    formats: Sequence[str] = FORMATS,
    dynamic_batch: bool = True,
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.onnx`` and/or ``<out_dir>/<name>.pt2``; returns format name -> path.

    Inputs default to the names of ``forward``'s parameters, outputs to ``output`` (one output) or
    ``output_0``, ``output_1``, …. The model runs in eval mode during export (its mode is restored after).
    With ``dynamic_batch``, an example batch of 1 is repeated to 2 internally, because torch.export would
    otherwise fix the batch size at 1; the exported programs accept any batch size. Each file is written
    under a temporary name and renamed into place, so a crash never leaves a partial file under the
    final name. ONNX files are single files (no external data), which limits them to 2 GiB.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InvalidInput(f"unknown export format(s) {unknown or list(formats)}; choose from {', '.join(FORMATS)}")
    if not _NAME.fullmatch(name):
        raise InvalidInput(f"name {name!r} must be a plain file name: letters, digits, '.', '_' or '-'")
    args = tuple(example_inputs)
    if not args or not all(isinstance(t, torch.Tensor) for t in args):
        raise InvalidInput("example_inputs must be a non-empty tuple of tensors")
    in_names = _check_names("input_names", input_names or _default_input_names(model, len(args)), len(args))
    if dynamic_batch:
        args = _batched(args)
        batch = torch.export.Dim("batch")
        dynamic_shapes: tuple[dict[int, object], ...] | None = tuple({0: batch} for _ in args)
    else:
        dynamic_shapes = None

    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)

    n_outputs = len(program.graph_signature.user_outputs)
    default_outputs = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    out_names = _check_names("output_names", output_names or default_outputs, n_outputs)

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "onnx" in formats:
        path = out_dir / f"{name}.onnx"
        with quiet_onnx_exporter():
            onnx_program = torch.onnx.export(
                program, args, None, dynamo=True, verbose=False, input_names=in_names, output_names=out_names
            )
        if onnx_program is None:  # only the legacy TorchScript exporter returns nothing
            raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
        with _atomic(path) as tmp:
            onnx_program.save(tmp, external_data=False)
        written["onnx"] = path
    if "torch_export" in formats:
        path = out_dir / f"{name}.pt2"
        extra = {NAMES_FILE: json.dumps({"input_names": in_names, "output_names": out_names})}
        with _atomic(path) as tmp, tmp.open("wb") as fh:
            torch.export.save(program, fh, extra_files=extra)
        written["torch_export"] = path
    logger.debug("exported %s to %s", name, ", ".join(str(p) for p in written.values()))
    return written


__all__ = ["FORMATS", "ClassifierHead", "export"]
