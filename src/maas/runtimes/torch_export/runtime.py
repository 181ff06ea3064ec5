"""The ``torch_export`` format and its runtime: a checked program run by torch."""

from __future__ import annotations

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
from maas.runtimes.torch_export.archive import NAMES_FILE
from maas.runtimes.torch_export.loader import read_program
from maas.tensors import Signature, TensorSpec

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
        program, names = read_program(path)
        return _signature(program, names, path)

    def load(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> TorchExportRuntime:
        # torch sets compute threads per process (torch.set_num_threads, from MAAS_RUNTIME_THREADS), not per model.
        del threads
        used = resolve_device(device, cuda_available=torch.cuda.is_available(), runtime="torch")
        program, names = read_program(path)
        signature = _signature(program, names, path)
        if used == "cuda":
            # Moves weights and rewrites device arguments baked into the graph (module.to() would miss those).
            program = move_to_device_pass(program, "cuda")
        return TorchExportRuntime(program, signature, used)


FORMAT = TorchExportFormat()
