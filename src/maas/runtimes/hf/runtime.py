"""The ``hf_transformers`` format and its runtime: texts in, sentence embeddings out.

The runtime tokenizes (:mod:`.tokenizer`) and runs either ``model.onnx`` with onnxruntime or the
safetensors model with torch (:mod:`.embedder`, imported only then). Neither backend is imported until a
model needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from maas.errors import InvalidInput
from maas.runtimes.base import select_outputs
from maas.runtimes.hf.archive import pack, unpack
from maas.runtimes.hf.model_dir import FEED_NAMES, ONNX_FILE, ModelDir, read_model_dir
from maas.runtimes.hf.tokenizer import Tokenizer
from maas.tensors import Signature, TensorSpec

log = logging.getLogger(__name__)

#: Texts per forward pass: bounds activation memory for large requests.
_CHUNK = 32


class _Backend(Protocol):
    """Runs the feed through the model and pooling: ``[n, seq]`` int64 arrays -> ``[n, hidden]`` float32."""

    def __call__(self, feed: Mapping[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...


class HFEmbeddingRuntime:
    """A loaded embedding model: tokenizer plus a torch or onnxruntime backend, both safe to share."""

    def __init__(self, info: ModelDir, tokenizer: Tokenizer, backend: _Backend, device: str) -> None:
        self.signature = _signature(info.hidden_size)
        self.device = device
        #: One text in, one embedding out, each computed on its own: requests may be batched.
        self.batches_rows = True
        self.tokenizer = tokenizer
        self._hidden = info.hidden_size
        self._backend: _Backend | None = backend

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        backend = self._backend
        if backend is None:
            raise RuntimeError("this hf_transformers runtime was closed; load the model again")
        names = select_outputs(self.signature, outputs)
        if "text" not in inputs:
            raise InvalidInput("missing input 'text'; the model takes text (BYTES [-1], one UTF-8 text per row)")
        texts = _texts(np.asarray(inputs["text"]))
        result = np.zeros((len(texts), self._hidden), dtype=np.float32)
        # Similar lengths per chunk keep padding (wasted compute) small; the order is restored below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), _CHUNK):
            rows = order[start : start + _CHUNK]
            result[rows] = backend(self.tokenizer.encode([texts[i] for i in rows]))
        return {name: result for name in names}

    def count_tokens(
        self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None
    ) -> tuple[int, int]:
        """(tokens read, 0): what the model read of each ``text`` row after its truncation, for usage and limits."""
        texts = _texts(np.asarray(inputs["text"])) if "text" in inputs else []
        read = 0
        for start in range(0, len(texts), _CHUNK):
            read += int(np.asarray(self.tokenizer.encode(texts[start : start + _CHUNK])["attention_mask"]).sum())
        return read, 0

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend = None


def _texts(array: np.ndarray) -> list[str]:
    if array.ndim != 1:
        raise InvalidInput(f"input 'text' has shape {list(array.shape)}; expected [-1], one text per row")
    texts = []
    for i, value in enumerate(array.tolist()):
        if isinstance(value, str):
            texts.append(value)
            continue
        if not isinstance(value, bytes | bytearray):
            raise InvalidInput(f"input 'text' row {i} is {type(value).__name__}; send BYTES (UTF-8 text)")
        try:
            texts.append(bytes(value).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input 'text' row {i} is not UTF-8 ({exc}); encode texts as UTF-8") from None
    return texts


def _signature(hidden: int) -> Signature:
    return Signature(
        inputs=(TensorSpec("text", "BYTES", (-1,)),),
        outputs=(TensorSpec("embedding", "FP32", (-1, hidden)),),
    )


class _OnnxBackend:
    def __init__(self, path: Path, device: str) -> None:
        from maas.runtimes.onnx import FORMAT as ONNX

        self.runtime = ONNX.load(path, device=device)
        self.feeds = [s.name for s in self.runtime.signature.inputs]

    def __call__(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        out = self.runtime.infer({name: feed[name] for name in self.feeds}, ["embedding"])["embedding"]
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.runtime.close()


def _check_onnx(info: ModelDir) -> int:
    """The embedding width of ``model.onnx`` after checking it is an embedding graph maas can feed."""
    from maas.runtimes.onnx import FORMAT as ONNX

    path = info.root / ONNX_FILE
    sig = ONNX.inspect(path)
    extra = [s.name for s in sig.inputs if s.name not in FEED_NAMES]
    out = sig.output("embedding")
    if extra or out is None or len(out.shape) != 2 or out.datatype != "FP32":
        raise InvalidInput(
            f"{ONNX_FILE} takes {', '.join(s.name for s in sig.inputs)} and returns "
            f"{', '.join(s.describe() for s in sig.outputs)}; maas serves ONNX graphs that take "
            f"{', '.join(FEED_NAMES)} and return embedding FP32 [-1, hidden]: write one with "
            "maas.runtimes.hf.export_onnx"
        )
    return out.shape[1] if out.shape[1] > 0 else info.hidden_size


class HFTransformersFormat:
    """The ``hf_transformers`` format: a Hugging Face directory, or one packed by :func:`pack`."""

    name = "hf_transformers"
    suffixes: tuple[str, ...] = ()

    def inspect(self, path: Path) -> Signature:
        info = read_model_dir(unpack(path))
        Tokenizer(info.root)  # a tokenizer.json that does not load is an invalid artifact
        return _signature(_check_onnx(info) if info.weights == "onnx" else info.hidden_size)

    def load(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> HFEmbeddingRuntime:
        # torch sets compute threads per process (torch.set_num_threads, from MAAS_RUNTIME_THREADS), not per model.
        del threads
        info = read_model_dir(unpack(path))
        tokenizer = Tokenizer(info.root)
        backend: _Backend
        if info.weights == "onnx":
            hidden = _check_onnx(info)
            info = replace(info, hidden_size=hidden)
            backend = _OnnxBackend(info.root / ONNX_FILE, device)
            used = backend.runtime.device
        else:
            from maas.runtimes.hf.embedder import TorchBackend

            torch_backend = TorchBackend(info, device)
            backend, used = torch_backend, torch_backend.device
        log.info("loaded %s (%s weights, %s pooling) on %s", path.name, info.weights, info.pooling, used)
        return HFEmbeddingRuntime(info, tokenizer, backend, used)

    def pack(self, directory: Path, dest: Path) -> Path:
        """Write ``directory`` as the single file the registry stores (see :func:`maas.runtimes.hf.archive.pack`)."""
        read_model_dir(directory)
        return pack(directory, dest)


FORMAT = HFTransformersFormat()
