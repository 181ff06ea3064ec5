"""``maas train``: validate the config, record the run, launch the workers through torchrun's elastic agent.

The same call runs on one machine or many (c10d rendezvous). Workers that die are restarted by the agent
(``max_restarts``) and resume from the run's last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from maas import envs
from maas.errors import InvalidInput, MaasError
from maas.imports import resolve
from maas.registry import Registry
from maas.registry.entities import Run
from maas.training.config import TrainConfig, load_config, parse_config

log = logging.getLogger(__name__)


def _config(config: str | Path | dict[str, Any] | TrainConfig) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config)
    return load_config(config)


def check(cfg: TrainConfig, world_size: int) -> None:
    """Everything that can be checked before a process starts: imports, strategy against world size, batch split."""
    cfg.resolve_imports()
    cfg.check_world(cfg.strategy.data_parallel_size(world_size))


def train(
    config: str | Path | dict[str, Any] | TrainConfig | None = None,
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    rdzv_conf: str | None = None,
    local_addr: str | None = None,
    resume: str | None = None,
    max_restarts: int = 0,
    registry: Registry | None = None,
    progress: str | None = None,
) -> Run:
    """Run a training job to its end and return its record. ``resume`` continues a run (by id or unique
    prefix) from its last complete checkpoint, with the config it was started with.

    On several nodes every node runs this with the same config, ``nnodes`` and ``rdzv_endpoint``; they all
    derive one run id from the endpoint and ``rdzv_id`` (default: the config's hash), so they share one run
    folder (``MAAS_RUNS_DIR`` on a shared filesystem) and, with a shared database, one record. A node that
    finds the run already recorded joins it; a job that already succeeded needs a new ``rdzv_id``.

    Where the machines' hostnames do not name the addresses they reach each other on (containers, network
    namespaces, several interfaces), give each node its ``local_addr`` (the address its peers reach it at), give
    the node whose address is the endpoint's ``rdzv_conf="is_host=1"`` (torchrun's ``--rdzv-conf``; it hosts the
    rendezvous store) and set ``GLOO_SOCKET_IFNAME`` to the interface of that address (gloo otherwise binds the
    address its hostname resolves to).

    ``progress`` is the import path (``package.module:attribute``) of a :class:`~maas.training.loop.Progress`
    factory: the worker that reports builds one and tells it how far the run is (``maas train`` passes its
    progress bar). None: nothing is drawn; the steps are recorded on the run either way.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from maas.training import worker

    if nproc_per_node < 1 or nnodes < 1:
        raise InvalidInput("--nproc-per-node and --nnodes must be at least 1")
    if progress is not None:
        resolve(progress, "progress")  # a wrong path fails here, not in every worker
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise InvalidInput(f"--node-rank {node_rank} is outside 0..{nnodes - 1} for --nnodes {nnodes}")
    if nnodes > 1 and not rdzv_endpoint:
        raise InvalidInput("a multi-node run needs --rdzv-endpoint HOST:PORT, the same on every node")
    if rdzv_id is not None and (nnodes == 1 or resume is not None):
        raise InvalidInput(
            "--rdzv-id names a new job on several nodes: use it with --nnodes > 1 and without --resume "
            "(a resumed run keeps its id)"
        )
    extra_rdzv = _rdzv_conf(rdzv_conf)
    registry = registry or Registry()
    world_size = nproc_per_node * nnodes
    if resume is not None:
        run = registry.runs.get_run(resume)
        if run.status == "succeeded":
            raise InvalidInput(f"run {run.id} already succeeded; start a new run instead of resuming it")
        cfg = parse_config(run.config, f"run {run.id}")
        if config is not None and _config(config).config_hash() != cfg.config_hash():
            raise InvalidInput(f"run {run.id} was started with another config; resume it without a config")
        if run.world_size != world_size:
            log.warning("run %s was started on %d processes and resumes on %d", run.id, run.world_size, world_size)
    else:
        if config is None:
            raise InvalidInput("give a config file, or --resume RUN_ID")
        cfg = _config(config)
        check(cfg, world_size)
        job_id = None
        if nnodes > 1:
            job = f"{rdzv_endpoint}|{rdzv_id or cfg.config_hash()}"
            job_id = hashlib.sha256(job.encode()).hexdigest()[:32]
        run = registry.runs.create_run(
            cfg.to_json(), strategy=cfg.strategy.name, world_size=world_size, name=cfg.name, run_id=job_id
        )
        if run.status == "succeeded":
            raise InvalidInput(
                f"this job (run {run.id}) already succeeded; to train again, give every node the same new --rdzv-id"
            )
        if job_id is not None and run.status != "created":
            log.warning("joining run %s (%s), recorded by another node or an earlier try", run.id, run.status)
    if resume is not None:
        check(cfg, world_size)

    run_dir = runs_dir(registry) / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    registry.runs.start_run(run.id)
    launch_config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc_per_node,
        run_id=run.id,  # the same on every node: a fresh run's id is derived from the job there
        # c10d assigns node ranks itself; a fixed --node-rank asks for torchrun's static rendezvous instead.
        rdzv_backend="c10d" if node_rank is None else "static",
        rdzv_endpoint=rdzv_endpoint or "localhost:0",
        rdzv_configs=extra_rdzv | ({} if node_rank is None else {"rank": node_rank}),
        local_addr=local_addr,
        max_restarts=max_restarts,
        start_method="spawn",
        monitor_interval=0.1,
    )
    try:
        with _threads_per_worker(nproc_per_node), _fresh_store_per_round():
            results = elastic_launch(launch_config, worker.main)(
                cfg.to_json(), run.id, str(run_dir), str(registry.home), progress
            )
    except ChildFailedError as exc:
        registry.runs.finish_run(run.id, status="failed", error=_failure(exc))
        raise MaasError(
            f"training run {run.id} failed: {_failure(exc)}; fix the cause and continue it with "
            f"`maas train --resume {run.id}`"
        ) from None
    except KeyboardInterrupt:
        registry.runs.finish_run(run.id, status="interrupted", error="interrupted")
        raise
    except BaseException as exc:
        registry.runs.finish_run(run.id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    results = results or {}
    # The strategy's reporting rank (not always rank 0: a parameter server's is its first worker) evaluated it.
    reporting = next((r for r in results.values() if r and r.get("reports")), None)
    first: dict[str, Any] = reporting or results.get(0) or next(iter(results.values()), {})
    return registry.runs.finish_run(
        run.id, status="succeeded", eval_metrics=first.get("eval_metrics"), model_uri=first.get("model_uri")
    )


def _rdzv_conf(text: str | None) -> dict[str, str]:
    """torchrun's ``--rdzv-conf`` syntax, ``key=value,key=value``, as a dict."""
    conf: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"--rdzv-conf {text!r}: expected KEY=VALUE[,KEY=VALUE...], e.g. is_host=1")
        conf[key.strip()] = value.strip()
    return conf


def runs_dir(registry: Registry) -> Path:
    """Where runs keep their folders: ``MAAS_RUNS_DIR``, else the registry's home's ``runs/``."""
    return Path(envs.MAAS_RUNS_DIR).expanduser() if envs.MAAS_RUNS_DIR else registry.home / "runs"


@contextlib.contextmanager
def _threads_per_worker(nproc_per_node: int) -> Iterator[None]:
    """OMP_NUM_THREADS for the workers, as torchrun sets it: N processes each using every core oversubscribe
    the machine (8x slower seen here). Set only while they run: the caller's own environment (and a later
    single-process run from the same process) keeps its threads."""
    if nproc_per_node <= 1 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc_per_node))
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


@contextlib.contextmanager
def _fresh_store_per_round() -> Iterator[None]:
    """Workers meet in a store of their rendezvous round, never in one a dead worker wrote to.

    By default the agents share one store across rounds, and workers scope keys by TORCHELASTIC_RESTART_COUNT,
    which differs between nodes: an agent restarts its healthy workers for another node's failure without
    counting a restart. Its rank could then read the address a dead peer published ("Gloo connectFullMesh
    failed ... Connection refused"). With sharing off, each round's rank 0 hosts a new store.
    """
    key, before = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _failure(exc: Any) -> str:
    failures = getattr(exc, "failures", {}) or {}
    for rank, failure in sorted(failures.items()):
        message = getattr(failure, "message", "") or ""
        if isinstance(message, dict):
            message = message.get("message", str(message))
        first_line = str(message).strip().splitlines()[-1] if str(message).strip() else f"exit code {failure.exitcode}"
        return f"rank {rank}: {first_line}"
    return str(exc)
