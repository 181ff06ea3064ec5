"""The ``Runtime`` protocol: what a model format must provide to be registered and served."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from maas.tensors import Signature


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


class Format(Protocol):
    """A model format: how to read an artifact's signature and how to load it. One per module."""

    name: str
    #: File suffixes that identify the format without opening the file.
    suffixes: tuple[str, ...]

    def inspect(self, path: Path) -> Signature:
        """The signature stored in or inferred from the artifact; raises ``InvalidInput`` if the file
        is not a valid artifact of this format."""
        ...

    def load(self, path: Path, *, device: str = "cpu") -> Runtime:
        """Load the artifact for inference. Never executes code stored in the file."""
        ...
