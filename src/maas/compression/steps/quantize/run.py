"""Running the ``quantize`` step with either backend: quantize, time the results, keep the fastest.

This module runs the step the same way for every backend (:mod:`~maas.compression.steps.quantize.backend`):
quantize in the asked mode (or, for ``mode: auto``, in every mode the backend has), then time the fp32 input
and each int8 result at batch 32 on the example inputs, interleaved in this process, and keep the fastest.
What was measured always goes into the candidate's notes, and an int8 model that is not faster than its
fp32 input is said to be so plainly: int8 is not faster everywhere (small models, CPUs without int8
dot-product instructions).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence

import numpy as np

from maas.compression.candidate import Candidate, StepContext
from maas.compression.recipe import QuantizeStep
from maas.compression.steps.quantize.backend import Runner, backend
from maas.errors import InvalidInput

log = logging.getLogger(__name__)

#: Rows per timed call: the serving batch the choice is made for.
TIMING_BATCH = 32
#: Seconds of timed calls to spend (split over every model), within the bounds below.
TIMING_BUDGET_S = 4.0
MIN_ROUNDS, MAX_ROUNDS = 5, 30


def apply(step: QuantizeStep, cand: Candidate, ctx: StepContext) -> Candidate:
    """A new candidate: ``cand`` quantized to int8 by ``step.backend`` (see the module docstring)."""
    impl = backend(step.backend)
    fp32 = impl.prepare(cand, ctx)
    modes = impl.modes(step) if step.mode == "auto" else [step.mode]
    results: dict[str, Candidate] = {}
    failures: list[str] = []
    for i, mode in enumerate(modes):
        ctx.progress(f"quantize {step.backend} {mode}", i, len(modes))
        try:
            results[mode] = impl.quantize(step, mode, fp32, ctx)
        except InvalidInput as exc:
            if step.mode != "auto":
                raise
            log.warning("quantize %s %s failed: %s", step.backend, mode, exc)
            failures.append(f"int8 {mode} failed ({exc})")
    if not results:
        raise InvalidInput(f"quantize {step.backend} auto: every mode failed: {'; '.join(failures)}")
    ctx.progress(f"quantize {step.backend}: timing", len(modes), len(modes))

    runners = {"fp32": impl.runner(fp32, ctx, TIMING_BATCH)}
    runners.update({f"int8 {mode}": impl.runner(c, ctx, TIMING_BATCH) for mode, c in results.items()})
    ms, outputs, rounds = measure(runners)
    best = min(results, key=lambda mode: ms[f"int8 {mode}"])
    child = results[best]

    parts = [f"fp32 {ms['fp32']:.3g} ms"]
    for mode in results:
        name = f"int8 {mode}"
        parts.append(
            f"{name} {ms[name]:.3g} ms ({_speed(ms[name], ms['fp32'])}; {_agreement(outputs['fp32'], outputs[name])})"
        )
    child.notes.append(
        # The step times the example inputs repeated to a batch: texts of one length, no padding. The report
        # times the evaluation data, so its figures (and the speed-up) can differ from these.
        f"quantize {step.backend}: batch {TIMING_BATCH} of the example inputs repeated, on this CPU, median of "
        f"{2 * rounds} runs in {rounds} interleaved rounds: "
        + ", ".join(parts)
        + (f"; kept int8 {best}, the fastest" if len(results) > 1 else "")
    )
    child.notes.extend(failures)
    if ms[f"int8 {best}"] >= ms["fp32"]:
        child.notes.append(
            f"int8 {best} was {ms[f'int8 {best}'] / ms['fp32']:.2f}x slower than fp32 on this CPU "
            f"({ms[f'int8 {best}']:.3g} ms vs {ms['fp32']:.3g} ms at batch {TIMING_BATCH}); it is smaller, not faster"
        )
    if fp32.kind in ("onnx", "hf") and fp32.path is not None:  # the report measures it beside parent and child
        child.references.append(("fp32 before int8", fp32.path, "onnx" if fp32.kind == "onnx" else "hf_transformers"))
    line = impl.describe(step, best)
    if step.mode == "auto":
        line += f" (auto: fastest of {', '.join(results)})"
    child.history.append(line)
    return child


def measure(runners: dict[str, Runner]) -> tuple[dict[str, float], dict[str, Sequence[np.ndarray]], int]:
    """Median milliseconds per call of each runner, the outputs of each, and the number of rounds.

    Every round runs each runner in turn (so a busy machine slows all alike), as a short block: one untimed
    call, then two timed. The untimed call absorbs the previous model's thread pool, which spins for a
    while after its run (ORT's, OpenMP's) and would otherwise tax whichever model runs next.
    """
    outputs = {name: run() for name, run in runners.items()}  # warm-up: first calls allocate and plan
    start = time.perf_counter()
    for run in runners.values():
        run()
    per_round = 3 * max(time.perf_counter() - start, 1e-6)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TIMING_BUDGET_S // per_round)))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            run()
            for _ in range(2):
                t0 = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(s) for name, s in samples.items()}, outputs, rounds


def _speed(ms: float, fp32_ms: float) -> str:
    return f"{fp32_ms / ms:.2f}x faster" if ms < fp32_ms else f"{ms / fp32_ms:.2f}x slower"


def _agreement(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> str:
    """How close the int8 outputs are to fp32's on the timing batch: cosine of the first floating output."""
    for a, b in zip(ref, out, strict=False):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind == "f" and a.shape == b.shape and a.size:
            a2 = a.reshape(len(a), -1).astype(np.float64) if a.ndim else a.reshape(1, -1).astype(np.float64)
            b2 = b.reshape(a2.shape).astype(np.float64)
            norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
            cosine = float(np.mean((a2 * b2).sum(axis=1) / np.maximum(norms, 1e-12)))
            return f"output cosine to fp32 {cosine:.4f}"
    return "outputs not compared"
