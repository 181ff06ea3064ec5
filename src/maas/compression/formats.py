"""Everything compression uses from :mod:`maas.runtimes`: loading, converting and running model formats.

This is the one module of :mod:`maas.compression` that reaches into the runtimes (besides the heads
pruner, which reshapes Hugging Face attention blocks with :mod:`maas.runtimes.hf`). Each function
imports its runtime module on first use, since most of them pull in torch, onnx or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from maas.runtimes.base import Runtime
from maas.tensors import Signature

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram

__all__ = [
    "Runtime",
    "classifier_head",
    "export",
    "export_hf_onnx",
    "load",
    "load_program",
    "onnx_runtime",
    "onnx_signature",
    "tokenize",
    "unpack_hf",
]


def load(path: Path, format: str, *, device: str = "cpu") -> Runtime:
    """A registered artifact loaded by its format's runtime, as serving loads it."""
    from maas import runtimes

    return runtimes.load(path, format, device=device)


def onnx_runtime(path: Path) -> Runtime:
    """An ONNX file in the ``onnx`` runtime (the sessions maas serves with)."""
    from maas.runtimes.onnx import FORMAT as ONNX

    return ONNX.load(path)


def onnx_signature(path: Path) -> Signature:
    from maas.runtimes.onnx import FORMAT as ONNX

    return ONNX.inspect(path)


def load_program(path: Path) -> ExportedProgram:
    """The program in a ``.pt2`` archive, checked first: nothing pickled loads."""
    from maas.runtimes.torch_export import load_program

    return load_program(path)


def unpack_hf(path: Path) -> Path:
    """A Hugging Face model directory for ``path``: itself, or the packed file extracted."""
    from maas.runtimes.hf import unpack

    return unpack(path)


def export_hf_onnx(src_dir: Path, out_dir: Path) -> Path:
    """The safetensors model in ``src_dir`` as an ``hf_transformers`` directory holding ``model.onnx``."""
    from maas.runtimes.hf import export_onnx

    return export_onnx(src_dir, out_dir)


def export(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    out_dir: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    formats: Sequence[str],
) -> dict[str, Path]:
    """``module`` written as ``out_dir/model.onnx`` and/or ``model.pt2`` with a dynamic batch; format -> path."""
    from maas.runtimes.export import export

    return export(
        module,
        example_inputs,
        out_dir,
        name="model",
        input_names=input_names,
        output_names=output_names,
        formats=formats,
    )


def tokenize(directory: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """``texts`` as the feed the Hugging Face model in ``directory`` takes, tokenized as its runtime does."""
    from maas.runtimes.hf import Tokenizer

    return Tokenizer(directory).encode(texts)


def classifier_head(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (returning logits) serving (probabilities, label), like the training publisher's models."""
    from maas.runtimes.export import ClassifierHead

    head: torch.nn.Module = ClassifierHead(module)
    return head
