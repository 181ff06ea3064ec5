"""``maas train``: one command for one process or many, on one machine or several."""

from __future__ import annotations

from pathlib import Path

import typer


def train(
    config: Path | None = typer.Argument(None, help="The training config (YAML). Omit with --resume."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Worker processes on this machine."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines taking part."),
    node_rank: int | None = typer.Option(None, "--node-rank", help="This machine's rank (static rendezvous)."),
    rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous."),
    rdzv_id: str | None = typer.Option(
        None, "--rdzv-id", help="The job's name, the same on every node (default: from the config's hash)."
    ),
    rdzv_conf: str | None = typer.Option(
        None, "--rdzv-conf", help="More rendezvous settings, KEY=VALUE,... (is_host=1: this node hosts the store)."
    ),
    local_addr: str | None = typer.Option(
        None, "--local-addr", help="The address other nodes reach this one at (default: from the hostname)."
    ),
    resume: str | None = typer.Option(None, "--resume", help="Continue this run from its last checkpoint."),
    max_restarts: int = typer.Option(0, "--max-restarts", help="Restarts of failed workers before giving up."),
) -> None:
    """Train a model (single, ddp, …), checkpointing as it goes, and publish it to the registry."""
    from maas.cli.output import console
    from maas.cli.train_progress import RICH_PROGRESS
    from maas.training.launch import train as run_training

    run = run_training(
        config,
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_id=rdzv_id,
        rdzv_conf=rdzv_conf,
        local_addr=local_addr,
        resume=resume,
        max_restarts=max_restarts,
        progress=RICH_PROGRESS,  # drawn by the worker that reports, on this terminal
    )
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in run.eval_metrics.items()) or "-"
    console.print(f"run [bold]{run.id}[/] {run.status}: {run.strategy} on {run.world_size} process(es); {metrics}")
    if run.model_uri:
        console.print(f"published [bold]{run.model_uri}[/]; serve it with `maas serve`")
    console.print(f"details: `maas runs show {run.id[:12]}`")
