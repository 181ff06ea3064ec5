"""The inputs ONNX Runtime quantization runs a model on: the example inputs for timing and checks, and the
calibration dataset for ``static`` mode. Texts (a Hugging Face directory's inputs) are tokenized as the
model's ``hf_transformers`` runtime tokenizes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maas.compression import formats
from maas.compression.candidate import Candidate, StepContext, hf_onnx_file
from maas.compression.recipe import QuantizeStep
from maas.errors import InvalidInput
from maas.imports import resolve
from maas.tensors import Signature, numpy_dtype

#: Rows per calibration call (models with a fixed batch dimension get one row per call).
CALIBRATION_BATCH = 32


def model_file(cand: Candidate) -> Path:
    """The ONNX graph of the candidate: its file, or the ``model.onnx`` of its Hugging Face directory."""
    path = hf_onnx_file(cand) if cand.kind == "hf" else cand.path
    assert path is not None
    return path


def example_feed(cand: Candidate, ctx: StepContext, rows: int) -> dict[str, np.ndarray]:
    """The ONNX graph's inputs for ``rows`` rows: the example inputs repeated, texts tokenized."""
    signature = formats.onnx_signature(model_file(cand))
    if cand.kind == "hf":
        texts = _texts(list(ctx.example_inputs["text"]))
        return _tokenize(cand, [texts[i % len(texts)] for i in range(rows)], signature)
    missing = [s.name for s in signature.inputs if s.name not in ctx.example_inputs]
    if missing:
        raise InvalidInput(f"the example inputs lack {', '.join(missing)}, which the ONNX model takes")
    return {s.name: _repeat(ctx.example_inputs[s.name], rows) for s in signature.inputs}


class Feeds:
    """A CalibrationDataReader over prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibration_feeds(step: QuantizeStep, cand: Candidate, ctx: StepContext) -> list[dict[str, np.ndarray]]:
    """The inputs of the first ``calibration_samples`` examples of ``step.calibration``, as ONNX feeds."""
    spec = step.calibration
    if spec is None:
        raise InvalidInput("mode 'static' needs calibration: {dataset: package.module:function}")
    data = resolve(spec.dataset, "calibration.dataset")(**spec.kwargs)
    try:
        n = min(len(data), step.calibration_samples)
    except TypeError:
        raise InvalidInput(
            f"calibration.dataset {spec.dataset!r} returned a {type(data).__name__}, which has no length; return a "
            "list of texts or a map-style dataset of inputs or (input, label) pairs"
        ) from None
    if n == 0:
        raise InvalidInput(f"calibration.dataset {spec.dataset!r} is empty")
    items = [data[i] for i in range(n)]
    signature = formats.onnx_signature(model_file(cand))
    if cand.kind == "hf":
        texts = _texts([item[0] if isinstance(item, tuple | list) else item for item in items])
        return [_tokenize(cand, texts[i : i + CALIBRATION_BATCH], signature) for i in range(0, n, CALIBRATION_BATCH)]
    columns = _columns(items, signature, spec.dataset)
    dynamic = all(s.shape and s.shape[0] == -1 for s in signature.inputs)
    size = CALIBRATION_BATCH if dynamic else 1
    return [{name: col[i : i + size] for name, col in columns.items()} for i in range(0, n, size)]


def _columns(items: Sequence[Any], signature: Signature, dataset: str) -> dict[str, np.ndarray]:
    n_in = len(signature.inputs)
    rows = [tuple(item) if isinstance(item, tuple | list) else (item,) for item in items]
    if len(rows[0]) not in (n_in, n_in + 1):
        raise InvalidInput(
            f"calibration.dataset {dataset!r} items have {len(rows[0])} parts; the model takes {n_in} input(s) "
            f"({', '.join(s.name for s in signature.inputs)}), so items must be the inputs, optionally with a label"
        )
    columns = {}
    for i, spec in enumerate(signature.inputs):
        values = [np.asarray(r[i].detach().cpu() if hasattr(r[i], "detach") else r[i]) for r in rows]
        columns[spec.name] = np.stack(values).astype(numpy_dtype(spec.datatype), copy=False)
    return columns


def _texts(values: Sequence[Any]) -> list[str]:
    texts = []
    for v in values:
        if isinstance(v, bytes | bytearray):
            texts.append(bytes(v).decode("utf-8"))
        elif isinstance(v, str):
            texts.append(v)
        else:
            raise InvalidInput(f"a text model needs texts (str) for calibration and timing, got {type(v).__name__}")
    return texts


def _tokenize(cand: Candidate, texts: list[str], signature: Signature) -> dict[str, np.ndarray]:
    assert cand.path is not None
    feed = formats.tokenize(cand.path, texts)
    return {s.name: feed[s.name] for s in signature.inputs}


def _repeat(array: np.ndarray, rows: int) -> np.ndarray:
    return np.take(np.asarray(array), np.arange(rows) % len(array), axis=0)
