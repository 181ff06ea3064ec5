"""ONNX models, run by onnxruntime.

The signature is read from the graph with the ``onnx`` package (initializers are weights, not inputs);
the model runs in an ``onnxruntime.InferenceSession`` on the CPU or, when asked and available, CUDA.

The registry stores one file, so a model is that file and nothing else: tensors kept in external data
files (which onnxruntime would read from any path the model names) are refused. The session is built
from the file's bytes, never its path, and :meth:`OnnxFormat.inspect` builds one too, so a graph that
onnxruntime cannot load (an unknown operator, a bad opset) is refused at registration, not when served.

Public API: ``FORMAT`` (the :class:`OnnxFormat` that :func:`maas.runtimes.get_format` returns for ``onnx``),
:class:`OnnxFormat` (``inspect``, ``load``) and :class:`OnnxRuntime` (a loaded model). Importing this module
imports onnx and onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from maas.errors import InvalidInput
from maas.runtimes.base import brief, resolve_device, select_outputs
from maas.tensors import Signature, TensorSpec

logger = logging.getLogger(__name__)

#: ONNX TensorProto element type -> OIP datatype.
_DATATYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.STRING: "BYTES",
}


def _spec(value: onnx.ValueInfoProto, path: Path) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise InvalidInput(
            f"{path.name}: {value.name!r} is a {kind}, not a tensor; maas serves tensor inputs and outputs"
        )
    tensor_type = value.type.tensor_type
    elem = tensor_type.elem_type
    if elem not in _DATATYPES:
        raise InvalidInput(
            f"{path.name}: {value.name!r} has ONNX element type {onnx.TensorProto.DataType.Name(elem)}, which has no "
            f"Open Inference Protocol datatype; supported: {', '.join(sorted(_DATATYPES.values()))}"
        )
    if not tensor_type.HasField("shape"):
        raise InvalidInput(
            f"{path.name}: {value.name!r} has no declared rank; give it a shape when exporting "
            "(use a symbolic name for dynamic dimensions)"
        )
    # dim_value 0 is ONNX's "not set": a dim_param (symbolic) or a dimension nobody named.
    shape = tuple(d.dim_value if d.dim_value > 0 else -1 for d in tensor_type.shape.dim)
    return TensorSpec(name=value.name, datatype=_DATATYPES[elem], shape=shape)


def _signature(model: onnx.ModelProto, path: Path) -> Signature:
    graph = model.graph
    # Before IR version 4 every initializer was also listed as a graph input; those are weights.
    weights = {init.name for init in graph.initializer}
    return Signature(
        inputs=tuple(_spec(v, path) for v in graph.input if v.name not in weights),
        outputs=tuple(_spec(v, path) for v in graph.output),
    )


#: Operators whose output can be as large as a value in their inputs says (or that loop as often): their cost is not
#: bounded by the size of the inputs.
_EXPANDING_OPS = frozenset(
    {
        *("ConstantOfShape", "Range", "Expand", "Tile", "Resize", "Upsample", "Pad", "OneHot", "MaxUnpool"),
        *("Col2Im", "CenterCropPad", "RandomNormal", "RandomUniform", "Multinomial", "DFT", "STFT"),
        *("BlackmanWindow", "HannWindow", "HammingWindow", "MelWeightMatrix"),
        *("Loop", "Scan", "If"),
    }
)


def _shared_batch_dim(model: onnx.ModelProto) -> bool:
    """Whether dimension 0 of every input and output is the same named symbol, used by no other dimension."""
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    values = [v for v in graph.input if v.name not in weights] + list(graph.output)
    firsts: set[str] = set()
    others: set[str] = set()
    for value in values:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if not dims or not dims[0].dim_param:
            return False
        firsts.add(dims[0].dim_param)
        others.update(d.dim_param for d in dims[1:] if d.dim_param)
    return len(firsts) == 1 and not firsts & others


def _cost_bounded(model: onnx.ModelProto) -> bool:
    graphs: list[onnx.GraphProto] = [model.graph]
    nodes: list[onnx.NodeProto] = [n for f in model.functions for n in f.node]
    while graphs:
        graph = graphs.pop()
        nodes.extend(graph.node)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
    return not any(n.op_type in _EXPANDING_OPS for n in nodes)


def _read(path: Path) -> tuple[bytes, onnx.ModelProto]:
    """The file's bytes (read once: the session is built from the very bytes that were checked) and its model."""
    try:
        data = path.read_bytes()
        model = onnx.load_model_from_string(data)
    except OSError as exc:
        raise InvalidInput(f"{path.name} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:  # DecodeError, …: all mean the same to the caller
        raise InvalidInput(f"{path.name} is not a readable ONNX model ({brief(exc)})") from None
    # Protobuf parses many short byte strings (an empty file among them) as a valid, empty message.
    if not model.ir_version or not model.graph.output:
        raise InvalidInput(f"{path.name} is not an ONNX model: it has no IR version or no graph outputs")
    _refuse_external_data(model, path)
    return data, model


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(where, tensor) for every tensor stored in the model: initializers, sparse initializers and tensor
    attributes, in the main graph, every subgraph, every local function and the training info."""
    graphs: list[onnx.GraphProto] = [model.graph]
    for info in model.training_info:
        graphs += [info.initialization, info.algorithm]
    nodes: list[onnx.NodeProto] = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            for tensor in graph.initializer:
                yield f"initializer {tensor.name!r}", tensor
            for sparse in graph.sparse_initializer:
                yield f"sparse initializer {sparse.values.name!r}", sparse.values
                yield f"sparse initializer {sparse.values.name!r}", sparse.indices
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for attr in node.attribute:
            where = f"attribute {attr.name!r} of node {node.name or node.op_type!r}"
            if attr.HasField("t"):
                yield where, attr.t
            for tensor in attr.tensors:
                yield where, tensor
            for sparse in [*([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []), *attr.sparse_tensors]:
                yield where, sparse.values
                yield where, sparse.indices
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)


def _refuse_external_data(model: onnx.ModelProto, path: Path) -> None:
    for where, tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise InvalidInput(
                f"{path.name}: the {where} keeps its data in an external file; maas stores a model as one "
                "file, so save it with its weights inside: onnx.save(onnx.load(path), out, "
                "save_as_external_data=False) (models up to 2 GiB), then register out"
            )


def _session(
    data: bytes,
    path: Path,
    providers: Sequence[str],
    optimization: ort.GraphOptimizationLevel,
    threads: int | None = None,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization
    if threads is not None:  # else onnxruntime's default: one thread per physical core
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Idle compute threads spin 150 us for the next call, then sleep: long enough for back-to-back requests to skip
    # a wake-up (one-connection p50 0.37 ms here, against 0.53 ms never spinning), short enough that the spin does
    # not take the cores a server's event loop needs under load (ONNX Runtime's default spin cost p99 at 64).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.intra_op.spin_duration_us", "150")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT's own warnings (e.g. unused initializers) go to stderr, outside our logging; keep errors only.
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(data, sess_options=options, providers=list(providers))
    except Exception as exc:
        raise InvalidInput(
            f"onnxruntime {ort.__version__} cannot load {path.name}: {brief(exc, limit=600)}. Every operator must "
            "be a standard ONNX (or onnxruntime contrib) operator at an opset this onnxruntime supports; "
            "re-export the model, or check it with onnx.checker.check_model"
        ) from None


def _to_ort(name: str, value: np.ndarray) -> np.ndarray:
    """BYTES arrive as object arrays of ``bytes``; ORT string tensors want ``str``."""
    try:
        flat = [v.decode("utf-8") if isinstance(v, bytes | bytearray) else str(v) for v in value.ravel()]
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"input {name!r} holds bytes that are not UTF-8 text ({exc}); ONNX strings are UTF-8"
        ) from None
    return np.array(flat, dtype=object).reshape(value.shape)


def _from_ort(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind in ("U", "S", "O"):
        flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.ravel()]
        return np.array(flat, dtype=object).reshape(array.shape)
    return array


class OnnxRuntime:
    """One loaded ONNX model. ``InferenceSession.run`` is thread-safe, so one session serves all threads."""

    def __init__(
        self,
        session: ort.InferenceSession,
        signature: Signature,
        device: str,
        *,
        batches_rows: bool = False,
        cost_bounded: bool = False,
    ) -> None:
        self._session: ort.InferenceSession | None = session
        self.signature = signature
        self.device = device
        #: Dimension 0 of every input and output is one named batch dimension (see maas.runtimes.base.batches_rows).
        self.batches_rows = batches_rows
        #: No operator whose cost a value decides (see maas.runtimes.base.cost_bounded).
        self.cost_bounded = cost_bounded
        self._bytes_inputs = {s.name for s in signature.inputs if s.datatype == "BYTES"}

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RuntimeError("this ONNX runtime was closed; load the model again")
        names = select_outputs(self.signature, outputs)
        missing = [s.name for s in self.signature.inputs if s.name not in inputs]
        if missing:
            raise InvalidInput(f"missing input(s) {', '.join(missing)}; the model takes {_names(self.signature)}")
        feed = {
            s.name: _to_ort(s.name, inputs[s.name]) if s.name in self._bytes_inputs else inputs[s.name]
            for s in self.signature.inputs
        }
        results = self._session.run(names, feed)
        return {name: _from_ort(value) for name, value in zip(names, results, strict=True)}

    def close(self) -> None:
        self._session = None


def _names(signature: Signature) -> str:
    return ", ".join(s.name for s in signature.inputs)


class OnnxFormat:
    """The ``onnx`` format: ``.onnx`` files."""

    name = "onnx"
    suffixes: tuple[str, ...] = (".onnx",)

    def inspect(self, path: Path) -> Signature:
        data, model = _read(path)
        signature = _signature(model, path)
        # A session (unoptimised: quick) proves that onnxruntime can load every operator of the graph.
        _session(data, path, ["CPUExecutionProvider"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        return signature

    def load(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> OnnxRuntime:
        data, model = _read(path)
        signature = _signature(model, path)
        batches, bounded = _shared_batch_dim(model), _cost_bounded(model)
        del model
        want = resolve_device(
            device, cuda_available="CUDAExecutionProvider" in ort.get_available_providers(), runtime="onnxruntime"
        )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want == "cuda" else ["CPUExecutionProvider"]
        session = _session(data, path, providers, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads)
        used = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if used != want:
            logger.warning("%s: the CUDA provider failed to start; running on the CPU", path.name)
        return OnnxRuntime(session, signature, used, batches_rows=batches, cost_bounded=bounded)


FORMAT = OnnxFormat()

__all__ = ["FORMAT", "OnnxFormat", "OnnxRuntime"]
