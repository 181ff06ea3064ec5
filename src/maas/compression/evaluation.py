"""The recipe's evaluation data, and the task metrics parent and child are compared by.

:func:`load_eval_data` calls the dataset factory and shapes its items for the model's signature: texts,
inputs, or (inputs…, label). The metric is accuracy when the data has labels, else the mean cosine
similarity of a model's outputs to the parent's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from maas.compression.formats import Runtime
from maas.compression.recipe import EvaluationSpec
from maas.errors import InvalidInput
from maas.imports import resolve
from maas.tensors import Signature, numpy_dtype


@dataclass
class EvalData:
    """The evaluation dataset as model inputs (keyed by signature input name) and labels (or None)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batch(self, size: int, start: int = 0) -> dict[str, np.ndarray]:
        """``size`` rows from ``start``, wrapping around (so a batch of 32 exists even for 10 examples)."""
        n = len(self)
        idx = (np.arange(size) + start) % n
        return {k: v[idx] for k, v in self.inputs.items()}


def _as_array(values: Sequence[Any], datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        return np.array(flat, dtype=object)
    arrays = [np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for v in values]
    return np.stack(arrays).astype(numpy_dtype(datatype), copy=False)


def load_eval_data(spec: EvaluationSpec, signature: Signature) -> EvalData:
    """Call the dataset factory and shape its items for ``signature``: texts, inputs, or (inputs…, label)."""
    data = resolve(spec.dataset, "evaluation.dataset")(**spec.kwargs)
    try:
        n = len(data)
    except TypeError:
        raise InvalidInput(
            f"evaluation.dataset {spec.dataset!r} returned a {type(data).__name__}, which has no length; "
            "return a list of texts or a map-style dataset of (input, label) pairs"
        ) from None
    if n == 0:
        raise InvalidInput(f"evaluation.dataset {spec.dataset!r} is empty")
    n = min(n, spec.limit or n)
    items = [data[i] for i in range(n)]
    n_in = len(signature.inputs)
    if isinstance(items[0], str | bytes):
        rows: list[tuple[Any, ...]] = [(item,) for item in items]
    else:
        rows = [tuple(item) if isinstance(item, tuple | list) else (item,) for item in items]
    width = len(rows[0])
    if width not in (n_in, n_in + 1):
        raise InvalidInput(
            f"evaluation.dataset items have {width} parts; the model takes {n_in} input(s) "
            f"({', '.join(s.name for s in signature.inputs)}), "
            "so items must be the inputs, optionally followed by a label"
        )
    inputs = {
        spec_.name: _as_array([row[i] for row in rows], spec_.datatype) for i, spec_ in enumerate(signature.inputs)
    }
    labels = None
    if width == n_in + 1:
        labels = np.asarray([np.asarray(row[-1].item() if hasattr(row[-1], "item") else row[-1]) for row in rows])
    return EvalData(inputs=inputs, labels=labels)


def metric_output(signature: Signature, wanted: str | None) -> str:
    """The output the metric reads: ``wanted``, else the first floating-point output, else the first."""
    if wanted is not None:
        if signature.output(wanted) is None:
            raise InvalidInput(
                f"evaluation.output {wanted!r} is not an output of the model; it returns "
                + ", ".join(s.name for s in signature.outputs)
            )
        return wanted
    for s in signature.outputs:
        if s.datatype in ("FP32", "FP64", "FP16", "BF16"):
            return s.name
    return signature.outputs[0].name


def predict(runtime: Runtime, data: EvalData, output: str, batch_size: int) -> np.ndarray:
    """``output`` of ``runtime`` over the whole of ``data``, in batches of ``batch_size``."""
    parts = []
    for start in range(0, len(data), batch_size):
        size = min(batch_size, len(data) - start)
        parts.append(np.asarray(runtime.infer(data.batch(size, start), [output])[output]))
    return np.concatenate(parts)


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of scores (argmax over the last axis) or of predicted labels."""
    predicted = outputs.argmax(axis=-1) if outputs.ndim > labels.ndim else outputs
    return float((predicted.reshape(labels.shape) == labels).mean())


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows (flattened past the batch dimension)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))
