"""The function each worker process runs (started by torchrun's elastic agent, see :mod:`maas.training.launch`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from maas.imports import resolve
from maas.training.config import TrainConfig
from maas.training.loop import train_loop
from maas.training.stores import PrefixStore, Store, TCPStore
from maas.training.strategies import WorkerContext


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            logging.getLogger(__name__).warning("device cuda asked for but none is available; training on the CPU")
            return torch.device("cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _attempt_store(rank: int, world: int) -> Store:
    """The store this attempt's process group meets in, with no key left from an earlier attempt.

    ``maas train`` has the agents start a fresh store for every rendezvous round (see
    :func:`maas.training.launch.train`): rank 0 hosts it on the port its agent picked for the round. Under an
    agent that shares one store across rounds (torchrun's default), keys are scoped by the restart count; that
    count is only the same on every node when all of them restarted for a failure, so a node restarted for a
    membership change could read an address a dead peer published: ``maas train`` does not launch that way.
    """
    from datetime import timedelta

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=not agent_store and rank == 0,
        timeout=timedelta(minutes=10),
    )
    if not agent_store:
        return store
    return PrefixStore(f"/maas/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def main(config: dict[str, Any], run_id: str, run_dir: str, home: str, progress: str | None = None) -> dict[str, Any]:
    """Train (and, on rank 0, publish). Returns what the launcher records on the run.

    ``progress`` is the import path of a :class:`~maas.training.loop.Progress` factory (called with no
    arguments); the reporting rank tells it how far the run is. None: nothing is shown.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.model_validate(config)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = getattr(cfg.strategy, "backend", "auto")
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            store=_attempt_store(rank, world),
            rank=rank,
            world_size=world,
            device_id=device if device.type == "cuda" else None,
        )
    ctx = WorkerContext(rank, world, local_rank, device, run_id, Path(run_dir))
    from maas.registry import Registry

    registry = Registry(home=Path(home))  # only the strategy's reporting rank writes to it
    try:
        reporter = resolve(progress, "progress")() if progress else None
        result = train_loop(cfg, ctx, registry, progress=reporter)
        out: dict[str, Any] = {
            "eval_metrics": result.eval_metrics,
            "steps": result.steps,
            "model_uri": None,
            "reports": result.model is not None,  # the strategy's reporting rank: the launcher records its result
        }
        if result.model is not None and cfg.publish is not None:
            from maas.training.publish import publish

            train_set = resolve(cfg.data.train, "data.train")(**cfg.data.kwargs)
            version = publish(result.model, cfg, run_id, result.eval_metrics, train_set, Path(run_dir), registry)
            out["model_uri"] = version.uri
        if world > 1:
            dist.barrier()
        return out
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
