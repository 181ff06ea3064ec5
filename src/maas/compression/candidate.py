"""The model as it moves through a recipe, and the conversions between its forms.

A :class:`Candidate` is one of three kinds:

- ``torch``: an ``nn.Module`` in memory whose ``forward`` takes the signature's inputs in order and
  returns its outputs in order (one tensor, or a tuple);
- ``onnx``: an ``.onnx`` file;
- ``hf``: a Hugging Face model directory (``config.json``, tokenizer, and safetensors weights or a
  ``model.onnx``), the ``hf_transformers`` format.

Steps take a candidate and return a new one; they never change the parent's files. Conversions
(``torch`` → ``onnx`` by export, ``onnx`` → ``torch`` by import) happen here, so each step asks for
the kind it works on.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from maas.compression import formats
from maas.compression.recipe import EvaluationSpec
from maas.errors import InvalidInput
from maas.tensors import Signature

if TYPE_CHECKING:
    from torch import nn

Kind = Literal["torch", "onnx", "hf"]
#: Progress callback: (description, completed, total).
Progress = Callable[[str, int, int], None]


@dataclass
class Candidate:
    kind: Kind
    #: The serving signature the child keeps (input and output names, datatypes), the parent's by default.
    signature: Signature
    #: ``torch``: the module.
    module: nn.Module | None = None
    #: ``onnx``: the file; ``hf``: the directory.
    path: Path | None = None
    #: The registry format the candidate is saved as when the recipe ends without an ``export`` step.
    format: str = "onnx"
    #: One line per step applied, for the lineage.
    history: list[str] = field(default_factory=list)
    #: Findings the report prints (e.g. "int8 was not faster than fp32 on this CPU; kept fp32").
    notes: list[str] = field(default_factory=list)
    #: Intermediate models the report also measures beside parent and child: (label, path, registry format),
    #: e.g. the fp32 ONNX model an int8 child was quantized from.
    references: list[tuple[str, Path, str]] = field(default_factory=list)

    def evolve(self, **changes: Any) -> Candidate:
        return replace(
            self, history=list(self.history), notes=list(self.notes), references=list(self.references), **changes
        )


@dataclass
class StepContext:
    """What every step may use besides the candidate."""

    #: A fresh directory the step may write into (it outlives the step; the pipeline removes it at the end).
    workdir: Path
    #: A few real inputs, keyed by signature input name (for tracing, export and shape checks).
    example_inputs: dict[str, np.ndarray]
    #: ``"cpu"`` or ``"cuda"``: where training steps run.
    device: str = "cpu"
    #: The recipe's evaluation dataset (steps that compare variants, e.g. distillation over seeds, use it).
    evaluation: EvaluationSpec | None = None
    #: Progress callback: (description, completed, total).
    progress: Progress = lambda desc, done, total: None

    def subdir(self, name: str) -> Path:
        d = self.workdir / name
        n = 1
        while d.exists():
            n += 1
            d = self.workdir / f"{name}-{n}"
        d.mkdir(parents=True)
        return d


def example_tensors(ctx: StepContext, signature: Signature) -> tuple[Any, ...]:
    """The example inputs as torch tensors in signature order (BYTES inputs cannot be tensors)."""
    import torch

    out = []
    for spec in signature.inputs:
        if spec.datatype == "BYTES":
            raise InvalidInput(f"input {spec.name!r} is BYTES (text); a torch model cannot take it directly")
        out.append(torch.from_numpy(np.ascontiguousarray(ctx.example_inputs[spec.name])))
    return tuple(out)


def from_artifact(path: Path, format: str, signature: Signature, ctx: StepContext) -> Candidate:
    """The registered artifact at ``path`` (of registry ``format``) as the candidate a recipe starts from."""
    if format == "onnx":
        return Candidate(kind="onnx", signature=signature, path=path, format="onnx")
    if format == "torch_export":
        from maas.compression.graph_module import as_graph_module

        # A loaded program's .module() refuses .eval()/.train(); a plain GraphModule owning its weights does not.
        module = as_graph_module(formats.load_program(path).module(), example_tensors(ctx, signature))
        return Candidate(kind="torch", signature=signature, module=module, format="torch_export")
    return Candidate(kind="hf", signature=signature, path=formats.unpack_hf(path), format="hf_transformers")


def to_torch(cand: Candidate, ctx: StepContext, *, why: str) -> Candidate:
    """The candidate as a ``torch`` module; ``why`` names the step that needs it, for the error."""
    if cand.kind == "torch":
        return cand
    if cand.kind == "onnx":
        from maas.compression.onnx_import import import_onnx

        assert cand.path is not None
        module = import_onnx(cand.path)
        return cand.evolve(kind="torch", module=module, path=None)
    raise InvalidInput(
        f"{why} works on torch and ONNX models; this one is a Hugging Face directory. "
        "Use a step that supports hf_transformers (prune target heads, export onnx, quantize)"
    )


def to_onnx(cand: Candidate, ctx: StepContext) -> Candidate:
    """The candidate as an ONNX file (a torch module is exported with a dynamic batch dimension)."""
    if cand.kind == "onnx":
        return cand
    if cand.kind == "hf":
        assert cand.path is not None
        out = ctx.subdir("hf-onnx")
        formats.export_hf_onnx(cand.path, out)
        return cand.evolve(path=out)
    files = _export(cand, ctx, "onnx")
    return cand.evolve(kind="onnx", path=files["onnx"], module=None)


def _export(cand: Candidate, ctx: StepContext, fmt: str) -> dict[str, Path]:
    assert cand.module is not None
    return formats.export(
        cand.module,
        example_tensors(ctx, cand.signature),
        ctx.subdir("export"),
        input_names=[s.name for s in cand.signature.inputs],
        output_names=[s.name for s in cand.signature.outputs],
        formats=(fmt,),
    )


def hf_onnx_file(cand: Candidate) -> Path | None:
    """The ``model.onnx`` inside a Hugging Face directory candidate, if it has one."""
    if cand.kind != "hf" or cand.path is None:
        return None
    f = cand.path / "model.onnx"
    return f if f.is_file() else None


def save(cand: Candidate, ctx: StepContext, format: str | None = None) -> tuple[Path, str]:
    """Write the candidate as a registrable artifact; returns (path, registry format)."""
    fmt = format or cand.format
    if cand.kind == "hf":
        assert cand.path is not None
        return cand.path, "hf_transformers"
    if fmt == "onnx":
        onnx_cand = to_onnx(cand, ctx)
        assert onnx_cand.path is not None
        return onnx_cand.path, "onnx"
    if fmt == "torch_export":
        if cand.kind != "torch":
            raise InvalidInput("an ONNX model cannot be exported to torch_export; export to onnx instead")
        return _export(cand, ctx, "torch_export")["torch_export"], "torch_export"
    raise InvalidInput(f"cannot save a {cand.kind} model as {fmt!r}")


def copy_dir(src: Path, dst: Path, *, skip: Callable[[Path], bool] = lambda p: False) -> Path:
    """Copy a model directory (files only, no links), leaving out what ``skip`` says."""
    for item in sorted(src.rglob("*")):
        rel = item.relative_to(src)
        if item.is_symlink() or skip(rel):
            continue
        if item.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item, dst / rel)
    return dst
