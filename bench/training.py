"""Training throughput: samples/s of each strategy against a hand-written PyTorch loop, same model and data.

The hand-written loop is the reference: a tensor-slicing loop with no framework around it. Each strategy
runs through the real launcher (torchrun's elastic agent, worker processes); its samples/s is the
median of the windows the run recorded (start-up, the first window and checkpoints excluded).
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
HIDDEN, DEPTH, BATCH, STEPS, LOG_EVERY = 512, 2, 64, 600, 50
STRATEGIES: list[tuple[str, int, dict[str, Any]]] = [
    ("single", 1, {"name": "single"}),
    ("ddp", 2, {"name": "ddp"}),
    ("parameter_server sync (1 server, 1 worker)", 2, {"name": "parameter_server", "servers": 1, "mode": "sync"}),
    ("parameter_server async (1 server, 1 worker)", 2, {"name": "parameter_server", "servers": 1, "mode": "async"}),
    ("pipeline 1f1b (2 stages, 4 microbatches)", 2, {"name": "pipeline", "schedule": "1f1b", "microbatches": 4}),
]


def hand_written(steps: int = STEPS) -> float:
    """samples/s of a plain loop: shuffled slices, forward, cross-entropy, backward, AdamW."""
    from maas.demo.digits import mlp, train_dataset

    x, y = train_dataset().tensors
    torch.manual_seed(0)
    model = mlp(HIDDEN, DEPTH)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per_epoch = len(x) // BATCH
    done, started = 0, 0.0
    warmup = LOG_EVERY
    epoch = 0
    while done < steps + warmup:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        epoch += 1
        for s in range(per_epoch):
            if done == warmup:
                started = time.perf_counter()
            idx = perm[s * BATCH : (s + 1) * BATCH]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            done += 1
            if done >= steps + warmup:
                break
    return steps * BATCH / (time.perf_counter() - started)


def strategy_rate(strategy: dict[str, Any], nproc: int) -> float:
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
        rates = [s.samples_per_s for s in registry.run_steps(run.id)[1:] if s.samples_per_s]
    return statistics.median(rates)


def run(console: Console) -> None:
    machine = report.machine_info(("torch",))
    reference = hand_written()
    rows = [{"path": "hand-written loop", "processes": 1, "samples_per_s": reference, "ratio": 1.0}]
    for name, nproc, strategy in STRATEGIES:
        rate = strategy_rate(strategy, nproc)
        rows.append({"path": f"maas {name}", "processes": nproc, "samples_per_s": rate, "ratio": rate / reference})

    table = Table(title=f"training: MLP 64-{HIDDEN}x{DEPTH}-10 on digits, batch {BATCH}, {STEPS} steps")
    for col in ("path", "processes", "samples/s", "ratio to hand-written"):
        table.add_column(col, justify="left" if col == "path" else "right")
    cells = [[r["path"], str(r["processes"]), f"{r['samples_per_s']:,.0f}", f"{r['ratio']:.3f}"] for r in rows]
    for c in cells:
        table.add_row(*c)
    console.print(table)
    config = {"hidden": HIDDEN, "depth": DEPTH, "batch": BATCH, "steps": STEPS, "log_every": LOG_EVERY}
    json_path = report.write_json(NAME, {"benchmark": NAME, "machine": machine, "config": config, "results": rows})
    body = (
        f"{machine['timestamp']}: MLP 64-{HIDDEN}x{DEPTH}-10, AdamW, global batch {BATCH}, {STEPS} timed steps.\n\n"
        + report.markdown_table(["path", "processes", "samples/s", "ratio to hand-written"], cells)
    )
    md_path = report.write_markdown_section(NAME, "Training benchmark", report.machine_key(machine), body)
    console.print(f"wrote {json_path} and {md_path}")
