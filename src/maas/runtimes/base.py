"""The ``Runtime`` protocol: what a model format must provide to be registered and served."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from maas.errors import InvalidInput
from maas.tensors import Signature

log = logging.getLogger(__name__)

#: An absolute POSIX path inside a message: a run of '/part' pieces not preceded by a word character.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/])(?:/[^\s/'\"`()\[\]{},;:]+)+/?")


@runtime_checkable
class Runtime(Protocol):
    """A loaded model, ready to run. Implementations must be safe to call from several threads."""

    signature: Signature
    device: str

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model. ``inputs`` are keyed by signature input name, already validated against the
        signature (dtype and shape); returns the requested outputs (all of them when ``outputs`` is
        None), keyed by name, as numpy arrays."""
        ...

    def close(self) -> None:
        """Release what the runtime holds (sessions, device memory)."""
        ...


def batches_rows(runtime: Runtime) -> bool:
    """Whether ``runtime`` declares that dimension 0 of every input and output is one and the same batch dimension
    (so requests may be concatenated along it and the outputs split back). A runtime says so with a true
    ``batches_rows`` attribute; one that does not is never batched."""
    return getattr(runtime, "batches_rows", False) is True


def cost_bounded(runtime: Runtime) -> bool:
    """Whether a call's work is bounded by the size of its inputs, never by their values (no operator that makes a
    tensor as large as a value asks): a true ``cost_bounded`` attribute says so. Only such a model may run on a
    server's event loop."""
    return getattr(runtime, "cost_bounded", False) is True


class Format(Protocol):
    """A model format: how to read an artifact's signature and how to load it. One per module."""

    name: str
    #: File suffixes that identify the format without opening the file.
    suffixes: tuple[str, ...]

    def inspect(self, path: Path) -> Signature:
        """The signature stored in or inferred from the artifact; raises ``InvalidInput`` if the file
        is not a valid artifact of this format."""
        ...

    def load(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> Runtime:
        """Load the artifact for inference. Never executes code stored in the file. ``threads``: compute threads
        for one call, where the runtime can set them per model (None: the runtime's default)."""
        ...


def resolve_device(device: str, *, cuda_available: bool, runtime: str) -> str:
    """``cpu``, ``cuda`` or ``auto`` -> the device to use; ``cuda`` without CUDA falls back to the CPU with a
    warning naming ``runtime``."""
    if device not in ("cpu", "cuda", "auto"):
        raise InvalidInput(f"unknown device {device!r}; expected cpu, cuda or auto")
    if device == "cuda" and not cuda_available:
        log.warning("device 'cuda' requested but %s sees no CUDA device; running on the CPU", runtime)
    return "cuda" if device != "cpu" and cuda_available else "cpu"


def select_outputs(signature: Signature, outputs: Sequence[str] | None) -> list[str]:
    """The requested output names in signature order; all of them when ``outputs`` is None."""
    known = [s.name for s in signature.outputs]
    if outputs is None:
        return known
    unknown = [n for n in outputs if n not in known]
    if unknown:
        raise InvalidInput(f"unknown output(s) {', '.join(unknown)}; the model returns {', '.join(known)}")
    wanted = set(outputs)
    return [n for n in known if n in wanted]


def brief(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one line a client may see: the innermost cause's type and first line, absolute paths cut to
    their last part (messages reach clients, and must not carry the server's paths), at most ``limit``
    characters."""
    while exc.__cause__ is not None and exc.__cause__ is not exc:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    text = _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
