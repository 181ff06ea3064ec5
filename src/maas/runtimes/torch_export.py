"""``torch.export`` programs (``.pt2`` archives written by ``torch.export.save``).

The program itself is JSON, but ``torch.export.load`` falls back to unpickling for some archive
members: tensor subclasses and custom objects among the weights and constants, legacy ``.pt`` payloads,
and sample inputs that the safe (``weights_only``) unpickler rejects; AOTInductor members are native
libraries it loads. :func:`_check_archive` reads the archive's table of contents and payload configs
first and refuses every such file, so loading never runs code stored in it.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
from torch.export.passes import move_to_device_pass
from torch.utils import _pytree as pytree

from maas.errors import InvalidInput
from maas.runtimes.base import resolve_device, select_outputs
from maas.tensors import Signature, TensorSpec

#: Extra file in the archive that names inputs and outputs (written by :func:`maas.runtimes.export.export`).
NAMES_FILE = "maas.json"

_DATATYPES: dict[torch.dtype, str] = {
    torch.float32: "FP32",
    torch.float64: "FP64",
    torch.float16: "FP16",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.uint8: "UINT8",
    torch.uint16: "UINT16",
    torch.uint32: "UINT32",
    torch.uint64: "UINT64",
    torch.bool: "BOOL",
}


def _check_archive(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse archives whose loading would unpickle or load native code (see the module docstring)."""
    names = zf.namelist()
    if len(set(names)) != len(names):
        # zipfile and torch's reader could pick different copies of a duplicated member.
        raise InvalidInput(f"{path.name}: the archive lists a member twice; re-export it with torch.export.save")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise InvalidInput(f"{path.name} is not a torch.export.save archive (expected one top-level folder)")
    root = roots.pop() + "/"
    members = {n[len(root) :] for n in names}
    if "archive_format" not in members or zf.read(root + "archive_format") != b"pt2":
        raise InvalidInput(
            f"{path.name} is not a torch.export.save archive of this torch version's format; "
            "re-export it with torch.export.save"
        )

    def refuse(member: str, why: str) -> InvalidInput:
        return InvalidInput(f"{path.name}: refusing to load {member!r}: {why}; maas loads only plain-tensor programs")

    for member in members:
        if member.startswith("data/aotinductor/"):
            raise refuse(member, "AOTInductor members are native code")
        if member.startswith(("data/weights/", "data/constants/")) and member.endswith(".pt"):
            raise refuse(member, "legacy pickled weights")
        if member.startswith(("data/weights/", "data/constants/")) and member.endswith("_config.json"):
            try:
                config = json.loads(zf.read(root + member))["config"]
                entries = list(config.items())
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise refuse(member, f"unreadable payload config ({exc})") from exc
            for fqn, meta in entries:
                if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                    raise refuse(member, f"{fqn!r} is pickled (a tensor subclass or custom object)")
                if member.startswith("data/constants/") and not str(meta.get("path_name", "")).startswith("tensor_"):
                    raise refuse(member, f"{fqn!r} is a custom object")
        if member.startswith("data/sample_inputs/"):
            # torch.export.load tries weights_only=True on these bytes and falls back to full unpickling if
            # that fails; the same safe load here predicts the outcome, so the fallback can never run.
            try:
                torch.load(io.BytesIO(zf.read(root + member)), weights_only=True)
            except Exception as exc:
                raise refuse(member, "sample inputs that the safe unpickler rejects") from exc


def _load_program(path: Path) -> tuple[ExportedProgram, dict[str, Any]]:
    """The checked program and the contents of its ``maas.json`` (empty when absent)."""
    try:
        with zipfile.ZipFile(path) as zf:
            _check_archive(path, zf)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidInput(f"{path.name} is not a torch.export archive (.pt2): {exc}") from exc
    extra: dict[str, Any] = {NAMES_FILE: ""}
    try:
        # A file object, not a path: torch warns about paths that do not end in .pt2 (registry blobs don't).
        with path.open("rb") as fh:
            program = torch.export.load(fh, extra_files=extra)
    except Exception as exc:
        raise InvalidInput(f"torch.export cannot load {path.name}: {exc}") from exc
    raw = extra.get(NAMES_FILE) or ""
    try:
        names = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise InvalidInput(f"{path.name}: extra file {NAMES_FILE} is not JSON: {exc}") from exc
    return program, names if isinstance(names, dict) else {}


def load_program(path: Path) -> ExportedProgram:
    """The program in a ``.pt2`` archive, after the same safety checks as :meth:`TorchExportFormat.load`."""
    return _load_program(path)[0]


def _spec(name: str, node: torch.fx.Node | None, path: Path) -> TensorSpec:
    value = node.meta.get("val") if node is not None else None
    if not isinstance(value, torch.Tensor):
        raise InvalidInput(f"{path.name}: {name!r} is not a tensor ({type(value).__name__}); maas serves tensors only")
    if value.dtype not in _DATATYPES:
        raise InvalidInput(
            f"{path.name}: {name!r} has dtype {value.dtype}, which has no Open Inference Protocol datatype; "
            f"supported: {', '.join(str(d) for d in _DATATYPES)}"
        )
    # Dynamic dimensions are SymInts in the FakeTensor's shape.
    shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return TensorSpec(name=name, datatype=_DATATYPES[value.dtype], shape=shape)


def _names(kind: str, given: Any, default: list[str], path: Path) -> list[str]:
    if given is None:
        return default
    if not isinstance(given, list) or len(given) != len(default) or not all(isinstance(n, str) for n in given):
        raise InvalidInput(
            f"{path.name}: {NAMES_FILE} {kind} must list {len(default)} names, got {given!r}; re-export the model"
        )
    return given


def _signature(program: ExportedProgram, names: Mapping[str, Any], path: Path) -> Signature:
    nodes = {n.name: n for n in program.graph.nodes}
    inputs = [s for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    outputs = [s for s in program.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    in_nodes = [nodes.get(s.arg.name) if isinstance(s.arg, TensorArgument) else None for s in inputs]
    out_nodes = [nodes.get(s.arg.name) if isinstance(s.arg, TensorArgument) else None for s in outputs]
    in_names = _names("input_names", names.get("input_names"), [getattr(s.arg, "name", "") for s in inputs], path)
    out_names = _names("output_names", names.get("output_names"), [f"output_{i}" for i in range(len(outputs))], path)
    return Signature(
        inputs=tuple(_spec(n, node, path) for n, node in zip(in_names, in_nodes, strict=True)),
        outputs=tuple(_spec(n, node, path) for n, node in zip(out_names, out_nodes, strict=True)),
    )


class TorchExportRuntime:
    """One loaded program. The module holds no per-call state, so threads may share it."""

    def __init__(self, program: ExportedProgram, signature: Signature, device: str) -> None:
        self.signature = signature
        self.device = device
        self._module: torch.nn.Module | None = program.module()
        self._in_spec = program.call_spec.in_spec
        # A program that writes into its inputs would write into the caller's arrays: give it copies.
        self._copy_inputs = bool(program.graph_signature.user_inputs_to_mutate)

    def _tensor(self, value: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(value)
        # torch.from_numpy warns on read-only arrays (np.frombuffer of a request body is one).
        if self._copy_inputs or not array.flags.writeable:
            array = array.copy()
        return torch.from_numpy(array).to(self.device)

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        module = self._module
        if module is None:
            raise RuntimeError("this torch.export runtime was closed; load the model again")
        names = select_outputs(self.signature, outputs)
        missing = [s.name for s in self.signature.inputs if s.name not in inputs]
        if missing:
            known = ", ".join(s.name for s in self.signature.inputs)
            raise InvalidInput(f"missing input(s) {', '.join(missing)}; the model takes {known}")
        flat = [self._tensor(inputs[s.name]) for s in self.signature.inputs]
        args, kwargs = pytree.tree_unflatten(flat, self._in_spec) if self._in_spec is not None else (flat, {})
        with torch.inference_mode():
            result = module(*args, **kwargs)
        leaves = pytree.tree_leaves(result)
        by_name = dict(zip((s.name for s in self.signature.outputs), leaves, strict=True))
        return {name: by_name[name].detach().cpu().numpy() for name in names}

    def close(self) -> None:
        self._module = None
        if self.device == "cuda":
            torch.cuda.empty_cache()


class TorchExportFormat:
    """The ``torch_export`` format: ``.pt2`` archives from ``torch.export.save``."""

    name = "torch_export"
    suffixes: tuple[str, ...] = (".pt2",)

    def inspect(self, path: Path) -> Signature:
        program, names = _load_program(path)
        return _signature(program, names, path)

    def load(self, path: Path, *, device: str = "cpu") -> TorchExportRuntime:
        used = resolve_device(device, cuda_available=torch.cuda.is_available(), runtime="torch")
        program, names = _load_program(path)
        signature = _signature(program, names, path)
        if used == "cuda":
            # Moves weights and rewrites device arguments baked into the graph (module.to() would miss those).
            program = move_to_device_pass(program, "cuda")
        return TorchExportRuntime(program, signature, used)


FORMAT = TorchExportFormat()
