"""``torch.export`` programs (``.pt2`` archives written by ``torch.export.save``).

``torch.export.load`` is not safe on an untrusted file. Its zip reader finds members case-insensitively;
it unpickles pickled weights and constants, and sample inputs that its safe unpickler rejects; it loads
AOTInductor members as native libraries. The program JSON itself reaches ``eval`` (symbolic expressions
go through ``sympy.sympify``), ``exec`` (guard code, and node names pasted into generated Python),
``importlib`` (pytree specs) and any callable reachable from ``torch`` (node targets).

So maas never hands an archive to torch's loader. It reads the archive with :mod:`zipfile` after
checking that its members are exactly the ones ``torch.export.save`` writes (compared the way torch
compares them: case-insensitively), rebuilds weights and constants from their raw bytes (never
unpickled), checks every operator, name, symbolic expression and pytree spec of the program, and gives
only the checked pieces to torch's deserializer. Sample inputs are never given to torch: without them
no guard code is generated, let alone executed.

One module per step: :mod:`.archive` (the member layout), :mod:`.weights` (tensors from raw bytes),
:mod:`.program` and :mod:`.symbolic` (the allow-list walk of the program JSON), :mod:`.loader` (the
steps in order, then torch's deserializer), :mod:`.runtime` (the format and its runtime).

Public API:

- ``FORMAT``: the :class:`TorchExportFormat` that :func:`maas.runtimes.get_format` returns for ``torch_export``.
- ``TorchExportFormat``, ``TorchExportRuntime``: the format (``inspect``, ``load``) and a loaded program.
- ``load_program(path)``: the checked ``ExportedProgram`` of a ``.pt2`` file, for code that transforms it.
- ``NAMES_FILE``: the extra member naming inputs and outputs, as :func:`maas.runtimes.export.export` writes it.

Importing this package imports torch.
"""

from __future__ import annotations

from maas.runtimes.torch_export.archive import NAMES_FILE
from maas.runtimes.torch_export.loader import load_program
from maas.runtimes.torch_export.runtime import FORMAT, TorchExportFormat, TorchExportRuntime

__all__ = ["FORMAT", "NAMES_FILE", "TorchExportFormat", "TorchExportRuntime", "load_program"]
