"""Reading a ``.pt2`` archive: the members checked, the program checked, then torch's deserializer."""

from __future__ import annotations

import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer
from torch.export import ExportedProgram

from maas.errors import InvalidInput
from maas.runtimes.base import brief
from maas.runtimes.torch_export.archive import NAMES_FILE, PROGRAM, check_sample_inputs, read_json, read_members
from maas.runtimes.torch_export.program import check_program, dict_to_dataclass
from maas.runtimes.torch_export.weights import payloads

#: torch's deserializer keeps its state in a module global and refuses to run twice at once.
_DESERIALIZE = threading.Lock()


def _deserialize(path: Path, members: Mapping[str, zipfile.ZipInfo], zf: zipfile.ZipFile) -> ExportedProgram:
    raw = read_json(path, zf, members[PROGRAM])
    try:
        serialized = dict_to_dataclass(schema.ExportedProgram, raw)
    except Exception as exc:  # the schema's own asserts, KeyError, TypeError, …
        raise InvalidInput(f"{path.name}: {PROGRAM} is not a torch.export program ({brief(exc)})") from None
    if not isinstance(serialized, schema.ExportedProgram):
        raise InvalidInput(f"{path.name}: {PROGRAM} is not a torch.export program")
    try:
        check_program(path, serialized)
    except RecursionError:
        raise InvalidInput(f"{path.name}: {PROGRAM} is nested too deeply") from None
    state_dict = payloads(path, zf, members, "weights")
    constants = payloads(path, zf, members, "constants")
    try:
        with _DESERIALIZE:
            program = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except Exception as exc:
        raise InvalidInput(
            f"torch.export cannot load {path.name}: {brief(exc)}; re-export it with torch.export.save "
            f"(this server runs torch {torch.__version__})"
        ) from None
    program._guards_code = []
    return program


def read_program(path: Path) -> tuple[ExportedProgram, dict[str, Any]]:
    """The checked program and the contents of its ``maas.json`` (empty when absent)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = read_members(path, zf)
            check_sample_inputs(path, zf, members)
            program = _deserialize(path, members, zf)
            names_info = members.get(f"extra/{NAMES_FILE}")
            names = read_json(path, zf, names_info) if names_info is not None and names_info.file_size else {}
    except InvalidInput:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise InvalidInput(f"{path.name} is not a torch.export archive (.pt2): {brief(exc)}") from None
    return program, names if isinstance(names, dict) else {}


def load_program(path: Path) -> ExportedProgram:
    """The program in a ``.pt2`` archive, after the same safety checks as loading it for serving."""
    return read_program(path)[0]
