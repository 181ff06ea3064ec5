"""Training throughput: samples/s of each strategy against a hand-written PyTorch loop, same model and data.

The hand-written loop is the reference: a tensor-slicing loop with no framework around it, run in this
process. Each strategy runs through the real launcher (torchrun's elastic agent, worker processes). Both
are measured the same way: samples/s over windows of ``LOG_EVERY`` steps, the first window (warm-up) left
out. The paths run interleaved, ``REPEATS`` rounds of each in turn, so a neighbour's load on a shared machine
falls on all of them rather than on one; a path's ratio is the median over rounds of its median window
against the hand-written loop's in the same round (paired), its samples/s the median of all its windows.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import report

NAME = "training"
HIDDEN, DEPTH, BATCH, STEPS, LOG_EVERY, REPEATS = 512, 2, 64, 2000, 50, 5
STRATEGIES: list[tuple[str, int, dict[str, Any]]] = [
    ("single", 1, {"name": "single"}),
    ("ddp", 2, {"name": "ddp"}),
    ("parameter_server sync (1 server, 1 worker)", 2, {"name": "parameter_server", "servers": 1, "mode": "sync"}),
    ("parameter_server async (1 server, 1 worker)", 2, {"name": "parameter_server", "servers": 1, "mode": "async"}),
    ("pipeline 1f1b (2 stages, 4 microbatches)", 2, {"name": "pipeline", "schedule": "1f1b", "microbatches": 4}),
]


def hand_written(steps: int = STEPS) -> list[float]:
    """samples/s per window of a plain loop: shuffled slices, forward, cross-entropy, backward, AdamW."""
    from maas.demo.digits import mlp, train_dataset

    x, y = train_dataset().tensors
    torch.manual_seed(0)
    model = mlp(HIDDEN, DEPTH)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_epoch = len(x) // BATCH
    total = steps + LOG_EVERY
    rates: list[float] = []
    done, epoch = 0, 0
    window = time.perf_counter()
    while done < total:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        epoch += 1
        for s in range(per_epoch):
            idx = perm[s * BATCH : (s + 1) * BATCH]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            done += 1
            if done % LOG_EVERY == 0:
                now = time.perf_counter()
                rates.append(BATCH * LOG_EVERY / (now - window))
                window = now
            if done >= total:
                break
    return rates[1:]


def strategy_rates(strategy: dict[str, Any], nproc: int) -> list[float]:
    """samples/s per window the run recorded, the first left out."""
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
        return [s.samples_per_s for s in registry.run_steps(run.id)[1:] if s.samples_per_s]


def run(console: Console) -> None:
    machine = report.machine_info(("torch",))
    paths = [("hand-written loop", 1, None), *((f"maas {n}", p, st) for n, p, st in STRATEGIES)]
    windows: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    for round_ in range(REPEATS):
        reference = 0.0
        for name, nproc, strategy in paths:
            console.print(f"[dim]round {round_ + 1}/{REPEATS}: {name}[/]")
            got = hand_written() if strategy is None else strategy_rates(strategy, nproc)
            windows[name] += got
            rate = statistics.median(got)
            if strategy is None:  # the hand-written loop runs first in each round: the round's reference
                reference = rate
            ratios[name].append(rate / reference)
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
                # Paired: each round's ratio to the hand-written loop measured just before it, then the median.
                "ratio": statistics.median(ratios[name]),
                "ratios": ratios[name],
            }
        )

    table = Table(title=f"training: MLP 64-{HIDDEN}x{DEPTH}-10 on digits, batch {BATCH}, {STEPS} steps")
    for col in ("path", "processes", "samples/s (median)", "p10-p90", "ratio to hand-written"):
        table.add_column(col, justify="left" if col == "path" else "right")
    cells = [
        [
            r["path"],
            str(r["processes"]),
            f"{r['samples_per_s']:,.0f}",
            f"{r['p10']:,.0f}-{r['p90']:,.0f}",
            f"{r['ratio']:.3f}",
        ]
        for r in rows
    ]
    for c in cells:
        table.add_row(*c)
    console.print(table)
    config = {
        "hidden": HIDDEN,
        "depth": DEPTH,
        "batch": BATCH,
        "steps": STEPS,
        "log_every": LOG_EVERY,
        "repeats": REPEATS,
    }
    json_path = report.write_json(NAME, {"benchmark": NAME, "machine": machine, "config": config, "results": rows})
    body = (
        f"{machine['timestamp']}: MLP 64-{HIDDEN}x{DEPTH}-10, AdamW, global batch {BATCH}, {STEPS} timed steps, "
        f"{REPEATS} interleaved rounds; samples/s is the median over windows of {LOG_EVERY} steps, the ratio the "
        "median over rounds of each round's ratio to the hand-written loop.\n\n"
        + report.markdown_table(["path", "processes", "samples/s (median)", "p10-p90", "ratio to hand-written"], cells)
    )
    md_path = report.write_markdown_section(NAME, "Training benchmark", report.machine_key(machine), body)
    console.print(f"wrote {json_path} and {md_path}")
