"""Training checkpoints in a run directory: complete or invisible, written and read through pickle-free DCP.

Layout: ``run_dir/checkpoints/step-00000100/`` holds DCP's ``*.distcp`` data files, ``.metadata.json`` (DCP's
global metadata, which stock DCP pickles) and a ``COMPLETE`` marker. A checkpoint is written under
``step-XXXXXXXX.partial/`` and renamed into place only after every rank has written and rank 0 has left the marker,
so a crash at any point leaves either the previous checkpoints or a ``.partial`` folder that ``latest()`` ignores.
How DCP is kept away from pickle is :mod:`maas.training.safe_dcp`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from maas.errors import Conflict, InvalidInput, NotFound
from maas.training.safe_dcp import (
    METADATA_FILE,
    PICKLED_METADATA_FILE,
    SafeFileSystemReader,
    SafeFileSystemWriter,
    SafeLoadPlanner,
    pickled_message,
    write_json_durably,
)

__all__ = [
    "METADATA_FILE",
    "SafeFileSystemReader",
    "SafeFileSystemWriter",
    "SafeLoadPlanner",
    "agreed_latest",
    "latest",
    "load",
    "rng_state",
    "save",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

MARKER_FILE = "COMPLETE"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STALE_DIR = re.compile(r"^step-\d+\.(partial|deleting)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dist(group: dist.ProcessGroup | None = None) -> tuple[bool, int, int]:
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(group), dist.get_world_size(group)
    return False, 0, 1


@contextmanager
def _dcp_call(distributed: bool, rank: int) -> Iterator[None]:
    """Run a dcp.save/dcp.load: quiet about single-process mode, failures as ordinary exceptions."""
    with warnings.catch_warnings():
        # dcp.save/dcp.load warn (UserWarning) that they assume one process when no process group exists; that is
        # exactly the single-process run we intend, so silence that one message and nothing else.
        if not distributed:
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        try:
            yield
        except CheckpointException as exc:
            # A BaseException, so `except Exception` in a training loop would miss it: hand back this rank's own
            # error (an OSError stays an OSError), or one naming the ranks that failed.
            own = exc.failures.get(rank)
            if own is not None:
                raise own[0] from exc
            raise RuntimeError(f"checkpoint failed on rank(s) {sorted(exc.failures)}: {exc}") from exc


def _rank0_then_all(
    distributed: bool,
    rank: int,
    fn: Callable[[], int],
    group: dist.ProcessGroup | None = None,
    doing: str = "writing the checkpoint",
) -> int:
    """Run ``fn() -> int`` on rank 0 (of ``group``) and hand its result (or failure) to every rank; also a barrier."""
    code, error = 0, None
    if rank == 0:
        try:
            code = fn()
        except Exception as exc:  # re-raised below on rank 0; other ranks must not hang at a barrier
            code, error = -1, exc
    if distributed:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        flag = torch.tensor([code], dtype=torch.int64, device=device)
        dist.broadcast(flag, group=group, group_src=0)
        code = int(flag.item())
    if error is not None:
        raise error
    if code == -1:
        raise RuntimeError(f"rank 0 failed while {doing}; see rank 0's log")
    return code


def _marker(path: Path) -> dict[str, Any] | None:
    try:
        with (path / MARKER_FILE).open("r", encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _complete(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (marker := _marker(p)) is not None and marker.get("step") == int(m.group(1)):
                found.append((int(m.group(1)), p))
    return sorted(found)


def _remove(path: Path) -> None:
    # Rename first so that a crash mid-delete leaves a name latest() ignores and the next save cleans up.
    doomed = path.with_name(path.name + ".deleting")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _prune(root: Path, keep: int | None) -> None:
    for p in root.iterdir():
        if _STALE_DIR.match(p.name) and p.is_dir():
            logger.info("removing unfinished checkpoint folder %s", p)
            shutil.rmtree(p)
    if keep is not None:
        for step, path in _complete(root)[:-keep]:
            logger.debug("removing checkpoint step %d (keep=%d)", step, keep)
            _remove(path)


def save(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    *,
    keep: int | None = 2,
    process_group: dist.ProcessGroup | None = None,
) -> Path:
    """Write ``state`` as ``run_dir/checkpoints/step-{step:08d}`` and return that path; collective.

    Every rank of ``process_group`` (default: all ranks) calls it when a process group exists; "rank 0" below is
    that group's first rank. The folder appears only once complete. Afterwards rank 0
    removes all but the newest ``keep`` complete checkpoints (``None``: keep all) and unfinished folders.
    DCP writes one copy of a key that several ranks hold, so per-rank values (RNG states) need per-rank keys.
    Raises ``Conflict`` if a complete checkpoint for ``step`` already exists.
    """
    if step < 0:
        raise InvalidInput(f"step must be >= 0, got {step}")
    if keep is not None and keep < 1:
        raise InvalidInput(f"keep must be >= 1 or None (keep all), got {keep}")
    distributed, rank, world_size = _dist(process_group)
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step:08d}"
    partial = final.with_name(final.name + ".partial")

    def prepare() -> int:
        root.mkdir(parents=True, exist_ok=True)
        if _marker(final) is not None:
            return 1
        for leftover in (partial, final):  # left by a crash; a marker-less `final` is never complete
            if leftover.exists():
                shutil.rmtree(leftover)
        return 0

    # The broadcast also orders rank 0's cleanup before any rank writes into `partial`.
    if _rank0_then_all(distributed, rank, prepare, process_group) == 1:
        raise Conflict(f"a complete checkpoint for step {step} already exists at {final}; save each step once")

    writer = SafeFileSystemWriter(partial, overwrite=False)
    with _dcp_call(distributed, rank):
        state_dict_saver.save(state, storage_writer=writer, planner=DefaultSavePlanner(), process_group=process_group)

    def publish() -> int:
        # Data and metadata files are fsynced by DCP; make their directory entries durable before the rename.
        marker = {"step": step, "world_size": world_size, "time": datetime.now(UTC).isoformat()}
        write_json_durably(partial / MARKER_FILE, marker)
        _fsync_dir(partial)
        os.replace(partial, final)
        _fsync_dir(root)
        return 0

    # The broadcast is the barrier: every rank has returned from dcp.save before rank 0 publishes, and none
    # returns before the checkpoint is visible.
    _rank0_then_all(distributed, rank, publish, process_group)
    if rank != 0 and partial.is_dir() and not final.is_dir():
        # Rank 0 renamed its own `partial`, not this one: this rank's run folder is on another filesystem
        # (a node of a multi-node run without shared storage). What it wrote here can never be resumed from.
        _warn_not_shared(rank, final)
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("saved checkpoint step %d to %s", step, final)
    if rank == 0:
        try:
            _prune(root, keep)
        except OSError:
            logger.warning("could not prune old checkpoints in %s", root, exc_info=True)
    return final


def latest(run_dir: Path) -> tuple[int, Path] | None:
    """The highest complete checkpoint as ``(step, path)``, or ``None``; unfinished folders are ignored."""
    found = _complete(Path(run_dir) / CHECKPOINTS_DIR)
    return found[-1] if found else None


_SHARED_HINT = (
    "a run's checkpoints live in MAAS_RUNS_DIR/RUN_ID (default MAAS_HOME/runs/RUN_ID), and every rank must see "
    "the same folder: on several machines, set MAAS_RUNS_DIR on each to one folder on a filesystem they all share "
    "(NFS, a cluster filesystem)"
)
_warned_not_shared = False


def _warn_not_shared(rank: int, final: Path) -> None:
    global _warned_not_shared
    if not _warned_not_shared:
        _warned_not_shared = True
        logger.warning(
            "rank %d does not see checkpoint %s that rank 0 wrote, so this run cannot resume after a failure; %s",
            rank,
            final,
            _SHARED_HINT,
        )


def agreed_latest(run_dir: Path, *, process_group: dist.ProcessGroup | None = None) -> tuple[int, Path] | None:
    """The checkpoint every rank of ``process_group`` resumes from: rank 0's :func:`latest`; collective.

    Every rank must see it (one filesystem); if one does not, every rank raises the same error rather than
    some loading and the others waiting for them.
    """
    distributed, rank, world_size = _dist(process_group)
    found = latest(run_dir)
    if not distributed:
        return found

    def choose() -> int:  # sent as step + 1: 0 is "none", and -1 is how _rank0_then_all reports a failure
        return found[0] + 1 if found else 0

    step = _rank0_then_all(distributed, rank, choose, process_group, "choosing the checkpoint to resume from") - 1
    if step < 0:
        return None
    path = Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(process_group) == "nccl" else None
    missing = torch.zeros(world_size, dtype=torch.int64, device=device)
    missing[rank] = int(_marker(path) is None)
    dist.all_reduce(missing, group=process_group)
    blind = [r for r, m in enumerate(missing.tolist()) if m]
    if blind:
        raise NotFound(
            f"rank 0 resumes from checkpoint step {step}, which rank(s) {blind} cannot see at {path}; {_SHARED_HINT}"
        )
    return step, path


def load(path: Path, state: dict[str, Any], *, process_group: dist.ProcessGroup | None = None) -> None:
    """Load the checkpoint at ``path`` into ``state`` in place; collective over ``process_group`` (default: all).

    ``state`` gives the keys, shapes and dtypes to read: tensors are filled in place, other values are replaced.
    """
    path = Path(path)
    if not (path / METADATA_FILE).is_file() and (path / PICKLED_METADATA_FILE).is_file():
        raise InvalidInput(pickled_message(path))
    # A `.partial` folder may already hold the marker if the crash came between writing it and the rename.
    if _marker(path) is None or _STALE_DIR.match(path.name):
        raise NotFound(
            f"{path} is not a complete checkpoint (no {MARKER_FILE} marker); use latest(run_dir) to pick one"
        )
    if not (path / METADATA_FILE).is_file():
        raise NotFound(f"{path} has no {METADATA_FILE}; it was not written by maas.training.checkpoint.save")
    distributed, rank, _ = _dist(process_group)
    with _dcp_call(distributed, rank):
        state_dict_loader.load(
            state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), process_group=process_group
        )


# --- RNG state as checkpointable values ------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, Python and NumPy RNG states as tensors and plain values.

    Pass the result back to ``set_rng_state``; store it under a per-rank key, since each rank has its own.
    """
    version, mt, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by ``rng_state``."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state["cuda"][str(i)] for i in range(len(state["cuda"]))])
