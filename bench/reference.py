"""The served model and what onnxruntime does with it in-process: the reference answers and the ceiling.

The ceiling is ``session.run`` with nothing around it, at batch 1 and 32 (rows/s); the per-request floor adds
what any JSON server must do once per request: parse the body, build the array, run, dump the answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

SIZES = (784, 1024, 1024, 10)
SEED = 0
WARMUP_S = 0.3


def build_mlp(path: Path) -> Path:
    """The 784→1024→1024→10 MLP (seeded), exported to ONNX with a dynamic batch: ``input`` FP32 [-1, 784] ->
    ``output`` FP32 [-1, 10]."""
    import torch

    torch.manual_seed(SEED)
    d_in, hidden, _, d_out = SIZES
    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, d_out),
    ).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, SIZES[0]),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    return path


def session(path: Path) -> ort.InferenceSession:
    """An onnxruntime session set up as the server sets up its own (``maas.runtimes.onnx``)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def rows(n: int, seed: int = SEED) -> np.ndarray:
    """``n`` fixed input rows, rounded to 4 decimals so that their JSON is short and reads back exactly."""
    return np.round(np.random.default_rng(seed).standard_normal((n, SIZES[0])), 4).astype(np.float32)


@dataclass(frozen=True)
class Loop:
    """``calls`` of one function in ``seconds``, each doing ``batch`` rows."""

    name: str
    batch: int
    calls: int
    seconds: float
    p50_us: float
    p99_us: float

    @property
    def rows_per_s(self) -> float:
        return self.calls * self.batch / self.seconds


def _loop(name: str, batch: int, call: Callable[[], object], seconds: float) -> Loop:
    end = time.perf_counter() + WARMUP_S
    while time.perf_counter() < end:
        call()
    latencies = []
    began = time.perf_counter_ns()
    end_ns = began + int(seconds * 1e9)
    while (t0 := time.perf_counter_ns()) < end_ns:
        call()
        latencies.append(time.perf_counter_ns() - t0)
    wall = (time.perf_counter_ns() - began) / 1e9
    us = np.asarray(latencies, dtype=np.float64) / 1e3
    return Loop(name, batch, len(latencies), wall, float(np.percentile(us, 50)), float(np.percentile(us, 99)))


def json_round_trip(sess: ort.InferenceSession, body: bytes) -> bytes:
    """What a JSON server does with one request, minus the HTTP: parse, run, dump."""
    request = json.loads(body)
    feeds = {t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) for t in request["inputs"]}
    results = sess.run(None, feeds)
    outputs = [
        {"name": out.name, "datatype": "FP32", "shape": list(value.shape), "data": value.ravel().tolist()}
        for out, value in zip(sess.get_outputs(), results, strict=True)
    ]
    return json.dumps({"outputs": outputs}).encode()


def ceiling(sess: ort.InferenceSession, body: bytes, seconds: float) -> dict[str, Loop]:
    """In-process figures: ``run`` at batch 1 and 32, and the JSON parse + run + dump floor of one request."""
    x1, x32 = rows(1), rows(32)
    return {
        "batch1": _loop("session.run, batch 1", 1, lambda: sess.run(None, {"input": x1}), seconds),
        "batch32": _loop("session.run, batch 32", 32, lambda: sess.run(None, {"input": x32}), seconds),
        "json": _loop("json parse + run + dump", 1, lambda: json_round_trip(sess, body), seconds),
    }
