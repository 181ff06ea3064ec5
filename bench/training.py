"""Training throughput: samples/s of each strategy against a hand-written PyTorch loop, same model and data.

The hand-written loop is the reference: a tensor-slicing loop with no framework around it, run in this
process. Each strategy runs through the real launcher (torchrun's elastic agent, worker processes). Both
are measured the same way: samples/s over windows of ``LOG_EVERY`` steps, the first window (warm-up) left
out. The paths run interleaved, ``REPEATS`` rounds of each in turn, so a neighbour's load on a shared machine
falls on all of them rather than on one; a path's ratio is the median over runs of its median window
against the round's latest hand-written run (paired), its samples/s the median of all its windows.
``single`` is the path with a target (>= 0.95 of the hand-written loop), so each round pairs it with the
hand-written loop ``SINGLE_PAIRS`` times: the noise of a shared 2-core machine (a run can lose a third of
its speed to a neighbour) needs more pairs than the other paths to give a stable median. A second ratio
compares each run's fast windows (its 90th percentile), the same way: interference only slows windows down,
so these estimate each path's undisturbed speed.

Last, ``single`` runs beside the hand-written loop, at the same time, one core (thread) each: whatever slows
the machine then slows both, and each window of ``single`` is compared with the hand-written loop's samples/s
over the same seconds. Of the three, this one is the least disturbed by a noisy machine; with one thread each,
the loop's fixed per-step cost weighs a little less against the slower step than with two.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import report

NAME = "training"
HIDDEN, DEPTH, BATCH, STEPS, LOG_EVERY, REPEATS, SINGLE_PAIRS = 512, 2, 64, 2000, 50, 5, 4
SIMULTANEOUS_ROUNDS = 5
STRATEGIES: list[tuple[str, int, dict[str, Any]]] = [
    ("single", 1, {"name": "single"}),
    ("ddp", 2, {"name": "ddp"}),
    ("parameter_server sync (1 server, 1 worker)", 2, {"name": "parameter_server", "servers": 1, "mode": "sync"}),
    ("parameter_server async (1 server, 1 worker)", 2, {"name": "parameter_server", "servers": 1, "mode": "async"}),
    ("pipeline 1f1b (2 stages, 4 microbatches)", 2, {"name": "pipeline", "schedule": "1f1b", "microbatches": 4}),
]


def _hand_loop(steps: int | None, stop: Path | None = None) -> list[tuple[float, float, int]]:
    """A plain loop: shuffled slices, forward, cross-entropy, backward, AdamW. Runs ``steps`` steps (or until
    the file ``stop`` exists) and returns its windows of ``LOG_EVERY`` steps as (start, end, samples), wall
    clock (``time.time()``)."""
    from maas.demo.digits import mlp, train_dataset

    x, y = train_dataset().tensors
    torch.manual_seed(0)
    model = mlp(HIDDEN, DEPTH)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_epoch = len(x) // BATCH
    windows: list[tuple[float, float, int]] = []
    done, epoch = 0, 0
    window = time.time()
    while steps is None or done < steps:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        epoch += 1
        for s in range(per_epoch):
            idx = perm[s * BATCH : (s + 1) * BATCH]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            done += 1
            if done % LOG_EVERY == 0:
                now = time.time()
                windows.append((window, now, BATCH * LOG_EVERY))
                window = now
                if stop is not None and stop.exists():
                    return windows
            if steps is not None and done >= steps:
                return windows
    return windows


def hand_written(steps: int = STEPS) -> list[float]:
    """samples/s per window of the hand-written loop, the first (warm-up) left out."""
    return [n / (end - start) for start, end, n in _hand_loop(steps + LOG_EVERY)[1:]]


def hand_stream(stop: str, out: str) -> None:
    """The hand-written loop in its own process until ``stop`` exists; its windows as JSON in ``out``."""
    Path(out).write_text(json.dumps(_hand_loop(None, Path(stop))))


def _best(rates: list[float]) -> float:
    """A run's fast windows: the 90th percentile of its windows' samples/s."""
    return statistics.quantiles(rates, n=10)[-1]


def strategy_rates(strategy: dict[str, Any], nproc: int) -> list[float]:
    """samples/s per window the run recorded, the first left out."""
    return [rate for _, _, rate in strategy_windows(strategy, nproc)]


def strategy_windows(strategy: dict[str, Any], nproc: int) -> list[tuple[float, float, float]]:
    """(start, end, samples/s) of each window the run recorded, the first left out; wall clock."""
    from maas.registry import Registry
    from maas.training.launch import train

    config = {
        "model": {"factory": "maas.demo.digits:mlp", "kwargs": {"hidden": HIDDEN, "depth": DEPTH}},
        "data": {"train": "maas.demo.digits:train_dataset"},
        "optimizer": {"name": "adamw", "lr": 0.001},
        "steps": STEPS + LOG_EVERY,
        "batch_size": BATCH,
        "log_every": LOG_EVERY,
        "strategy": strategy,
    }
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as home:
        registry = Registry(home=Path(home))
        run = train(config, nproc_per_node=nproc, registry=registry)
        steps = registry.runs.run_steps(run.id)
    return [
        (before.at.timestamp(), after.at.timestamp(), after.samples_per_s)
        for before, after in itertools.pairwise(steps)
        if after.samples_per_s
    ]


def _rate_during(windows: list[tuple[float, float, int]], start: float, end: float) -> float | None:
    """samples/s of a loop over [start, end] from its windows (each spread evenly over its span); None unless
    its windows cover the whole interval."""
    done = covered = 0.0
    for a, b, n in windows:
        overlap = min(b, end) - max(a, start)
        if overlap > 0:
            done += n * overlap / (b - a)
            covered += overlap
    return done / (end - start) if covered >= 0.999 * (end - start) else None


def simultaneous_ratios(console: Console) -> list[float]:
    """``single`` and the hand-written loop at the same time, one core (thread) each, so that whatever slows
    the machine slows both: per window of ``single``, its samples/s over the hand-written loop's in the same
    seconds."""
    ratios: list[float] = []
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # for both processes
    try:
        for round_ in range(SIMULTANEOUS_ROUNDS):
            console.print(
                f"[dim]simultaneous {round_ + 1}/{SIMULTANEOUS_ROUNDS}: single beside the hand-written loop[/]"
            )
            with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp:
                stop, out = Path(tmp) / "stop", Path(tmp) / "windows.json"
                code = f"import training; training.hand_stream({str(stop)!r}, {str(out)!r})"
                hand = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent)
                try:
                    maas = strategy_windows({"name": "single"}, 1)
                finally:
                    stop.touch()
                    hand.wait(timeout=120)
                reference = [tuple(w) for w in json.loads(out.read_text())]
            for start, end, rate in maas:
                other = _rate_during(reference, start, end)  # type: ignore[arg-type]
                if other:
                    ratios.append(rate / other)
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return ratios


def run(console: Console) -> None:
    machine = report.machine_info(("torch",))
    hand: tuple[str, int, dict[str, Any] | None] = ("hand-written loop", 1, None)
    paths = [hand, *((f"maas {n}", p, st) for n, p, st in STRATEGIES)]
    # Each round: (hand-written, single) SINGLE_PAIRS times, then the other strategies.
    order = [hand, paths[1]] * SINGLE_PAIRS + paths[2:]
    windows: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    best_ratios: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    for round_ in range(REPEATS):
        reference = best_reference = 0.0
        for name, nproc, strategy in order:
            console.print(f"[dim]round {round_ + 1}/{REPEATS}: {name}[/]")
            got = hand_written() if strategy is None else strategy_rates(strategy, nproc)
            windows[name] += got
            rate, best = statistics.median(got), _best(got)
            if strategy is None:  # the reference of the runs that follow it
                reference, best_reference = rate, best
            ratios[name].append(rate / reference)
            best_ratios[name].append(best / best_reference)
    rows = []
    for name, nproc, _ in paths:
        q = statistics.quantiles(windows[name], n=10)
        rows.append(
            {
                "path": name,
                "processes": nproc,
                "samples_per_s": statistics.median(windows[name]),
                "p10": q[0],
                "p90": q[-1],
                # Paired: each run's ratio to the round's latest hand-written run, then the median.
                "ratio": statistics.median(ratios[name]),
                "ratios": ratios[name],
                # The same with each run's fast windows (its 90th percentile): a neighbour only ever slows a
                # window down, so these are the closest to the undisturbed speed of each path.
                "ratio_best": statistics.median(best_ratios[name]),
                "ratios_best": best_ratios[name],
            }
        )

    columns = ("path", "processes", "samples/s (median)", "p10-p90", "ratio (median windows)", "ratio (fast windows)")
    table = Table(title=f"training: MLP 64-{HIDDEN}x{DEPTH}-10 on digits, batch {BATCH}, {STEPS} steps")
    for col in columns:
        table.add_column(col, justify="left" if col == "path" else "right")
    cells = [
        [
            r["path"],
            str(r["processes"]),
            f"{r['samples_per_s']:,.0f}",
            f"{r['p10']:,.0f}-{r['p90']:,.0f}",
            f"{r['ratio']:.3f}",
            f"{r['ratio_best']:.3f}",
        ]
        for r in rows
    ]
    for c in cells:
        table.add_row(*c)
    console.print(table)

    together = simultaneous_ratios(console)
    q = statistics.quantiles(together, n=10)
    simultaneous = {"windows": len(together), "ratio": statistics.median(together), "p10": q[0], "p90": q[-1]}
    console.print(
        f"single beside the hand-written loop, one core each: ratio {simultaneous['ratio']:.3f} (median of "
        f"{len(together)} windows, p10-p90 {q[0]:.3f}-{q[-1]:.3f})"
    )
    config = {
        "hidden": HIDDEN,
        "depth": DEPTH,
        "batch": BATCH,
        "steps": STEPS,
        "log_every": LOG_EVERY,
        "repeats": REPEATS,
        "single_pairs_per_round": SINGLE_PAIRS,
        "simultaneous_rounds": SIMULTANEOUS_ROUNDS,
    }
    json_path = report.write_json(
        NAME,
        {"benchmark": NAME, "machine": machine, "config": config, "results": rows, "simultaneous": simultaneous},
    )
    body = (
        f"{machine['timestamp']}: MLP 64-{HIDDEN}x{DEPTH}-10, AdamW, global batch {BATCH}, {STEPS} timed steps, "
        f"{REPEATS} interleaved rounds ({SINGLE_PAIRS} pairs of hand-written and single per round); samples/s is the "
        f"median over windows of {LOG_EVERY} steps; a ratio is the median over runs of each run's ratio to the "
        "round's latest hand-written run (for single, the one just before it), of their median windows, and of "
        "their fast windows (each run's 90th percentile of windows: a neighbour only slows a window down).\n\n"
        + report.markdown_table(list(columns), cells)
        + f"\n\n`single` and the hand-written loop run at the same time, one core (thread) each, {SIMULTANEOUS_ROUNDS} "
        f"runs: the median over {len(together)} windows of single's samples/s over the hand-written loop's in the "
        f"same seconds is **{simultaneous['ratio']:.3f}** (p10-p90 {q[0]:.3f}-{q[-1]:.3f}).\n"
    )
    md_path = report.write_markdown_section(NAME, "Training benchmark", report.machine_key(machine), body)
    console.print(f"wrote {json_path} and {md_path}")
