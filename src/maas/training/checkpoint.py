"""Training checkpoints: torch.distributed.checkpoint (DCP) without pickle, complete-or-invisible in a run directory.

Layout: ``run_dir/checkpoints/step-00000100/`` holds DCP's ``*.distcp`` data files, ``.metadata.json`` (DCP's
global metadata, which stock DCP pickles) and a ``COMPLETE`` marker. A checkpoint is written under
``step-XXXXXXXX.partial/`` and renamed into place only after every rank has written and rank 0 has left the marker,
so a crash at any point leaves either the previous checkpoints or a ``.partial`` folder that ``latest()`` ignores.

Stock DCP loads with pickle twice: ``FileSystemReader.read_metadata`` does ``pickle.load`` on ``.metadata``, and
``DefaultLoadPlanner.load_bytes`` does ``torch.load(weights_only=False)`` on every non-tensor value. Here the
metadata is JSON and non-tensor values go through ``torch.load(weights_only=True)`` (ints, floats, str, None, bools,
lists, tuples, dicts of those; tensor data is already read with ``weights_only=True`` by DCP itself).
"""

from __future__ import annotations

import io
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
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import (
    CURRENT_DCP_VERSION,
    FileSystemReader,
    FileSystemWriter,
    _StorageInfo,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from maas.errors import Conflict, InvalidInput, NotFound

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

METADATA_FILE = ".metadata.json"
PICKLED_METADATA_FILE = ".metadata"  # what stock DCP writes; refused on read
MARKER_FILE = "COMPLETE"
CHECKPOINTS_DIR = "checkpoints"
_FORMAT = "maas.dcp-metadata"
_FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STALE_DIR = re.compile(r"^step-\d+\.(partial|deleting)$")


# --- DCP metadata as JSON ---------------------------------------------------------------------------------------


def _torch_attr(kind: type, name: Any, what: str) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, kind):
        raise ValueError(f"{what} {name!r} is not a torch {kind.__name__}")
    return value


def _name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def _ints(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"expected a list of integers, got {value!r}")
    return value


def _encode_storage(md: Any) -> dict[str, Any]:
    if isinstance(md, BytesStorageMetadata):
        return {"type": "bytes"}
    if isinstance(md, TensorStorageMetadata):
        p = md.properties
        return {
            "type": "tensor",
            "dtype": _name(p.dtype),
            "layout": _name(p.layout),
            "requires_grad": p.requires_grad,
            "memory_format": _name(p.memory_format),
            "pin_memory": p.pin_memory,
            "size": list(md.size),
            "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks],
        }
    raise TypeError(f"cannot write DCP storage metadata of type {type(md).__name__} as JSON")


def _decode_storage(d: dict[str, Any]) -> TensorStorageMetadata | BytesStorageMetadata:
    if d["type"] == "bytes":
        return BytesStorageMetadata()
    if d["type"] != "tensor":
        raise ValueError(f"unknown storage type {d['type']!r}")
    props = TensorProperties(
        dtype=_torch_attr(torch.dtype, d["dtype"], "dtype"),
        layout=_torch_attr(torch.layout, d["layout"], "layout"),
        requires_grad=bool(d["requires_grad"]),
        memory_format=_torch_attr(torch.memory_format, d["memory_format"], "memory format"),
        pin_memory=bool(d["pin_memory"]),
    )
    chunks = [
        ChunkStorageMetadata(offsets=torch.Size(_ints(c["offsets"])), sizes=torch.Size(_ints(c["sizes"])))
        for c in d["chunks"]
    ]
    return TensorStorageMetadata(properties=props, size=torch.Size(_ints(d["size"])), chunks=chunks)


def _encode_planner_data(data: Any) -> dict[str, list[str | int]] | None:
    # DefaultSavePlanner stores {flat key: path tuple} here; loading in place does not need it, but
    # _EmptyStateDictLoadPlanner and the sharded-optimizer loader do, so keep it when it has that shape.
    if data is None:
        return None
    if isinstance(data, dict) and all(
        isinstance(k, str) and isinstance(v, tuple) and all(isinstance(p, str | int) for p in v)
        for k, v in data.items()
    ):
        return {k: list(v) for k, v in data.items()}
    raise TypeError(f"cannot write planner data of type {type(data).__name__} as JSON; use DefaultSavePlanner")


def _metadata_to_json(md: Metadata) -> dict[str, Any]:
    storage_data = []
    for index, info in (md.storage_data or {}).items():
        if not isinstance(info, _StorageInfo):
            raise TypeError(f"cannot write DCP storage data of type {type(info).__name__} as JSON")
        storage_data.append(
            {
                "fqn": index.fqn,
                "offset": None if index.offset is None else list(index.offset),
                "index": index.index,
                "relative_path": info.relative_path,
                "file_offset": info.offset,
                "length": info.length,
                "transform_descriptors": None
                if info.transform_descriptors is None
                else list(info.transform_descriptors),
            }
        )
    sm = md.storage_meta
    return {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "version": md.version,
        "state_dict_metadata": {fqn: _encode_storage(m) for fqn, m in md.state_dict_metadata.items()},
        "storage_data": storage_data,
        "planner_data": _encode_planner_data(md.planner_data),
        "storage_meta": None
        if sm is None
        else {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id,
            "modules": list(sm.modules),
        },
    }


def _metadata_from_json(d: dict[str, Any]) -> Metadata:
    if d.get("format") != _FORMAT or d.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"not {_FORMAT} version {_FORMAT_VERSION} (format={d.get('format')!r})")
    storage_data = {
        MetadataIndex(s["fqn"], None if s["offset"] is None else _ints(s["offset"]), s["index"]): _StorageInfo(
            relative_path=str(s["relative_path"]),
            offset=int(s["file_offset"]),
            length=int(s["length"]),
            transform_descriptors=None
            if s["transform_descriptors"] is None
            else [str(t) for t in s["transform_descriptors"]],
        )
        for s in d["storage_data"]
    }
    for info in storage_data.values():
        # relative_path comes from a file; never let it reach outside the checkpoint folder.
        if Path(info.relative_path).name != info.relative_path or info.relative_path in ("", ".", ".."):
            raise ValueError(f"storage path {info.relative_path!r} is not a plain file name")
    planner_data = d["planner_data"]
    sm = d["storage_meta"]
    return Metadata(
        state_dict_metadata={str(k): _decode_storage(v) for k, v in d["state_dict_metadata"].items()},
        planner_data=None if planner_data is None else {str(k): tuple(v) for k, v in planner_data.items()},
        storage_data=storage_data,
        storage_meta=None
        if sm is None
        else StorageMeta(checkpoint_id=sm["checkpoint_id"], save_id=sm["save_id"], modules=list(sm["modules"])),
        version=d["version"],
    )


def _write_json_durably(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SafeFileSystemWriter(FileSystemWriter):
    """``FileSystemWriter`` that writes the global metadata as ``.metadata.json`` instead of a pickle."""

    def _get_metadata_path(self, rank: int | None = None) -> os.PathLike[str]:
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        return Path(self.path) / name

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        # Same bookkeeping as FileSystemWriter.finish, minus pickle.dump.
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for wr_list in results for wr in wr_list}
        metadata.storage_meta = self.storage_meta()
        rank = self.rank if not self.use_collectives and self.rank is not None else None
        path = Path(self._get_metadata_path(rank))
        _write_json_durably(path, _metadata_to_json(metadata))


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor values are read with ``torch.load(weights_only=True)``.

    The stock planner uses ``weights_only=False``, i.e. full pickle, for every non-tensor value in the checkpoint.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` that reads ``.metadata.json`` and refuses pickled ``.metadata``.

    Use it with ``SafeLoadPlanner`` (it refuses any other planner, since the stock one unpickles non-tensor values).
    """

    def _get_metadata_path(self, rank: int | None = None) -> os.PathLike[str]:
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        return Path(self.path) / name

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self._get_metadata_path(rank))
        if not path.is_file():
            pickled = path.with_name(path.name.removesuffix(".json"))
            if pickled.is_file():
                raise InvalidInput(_pickled_message(Path(self.path)))
            raise NotFound(f"{path} does not exist; {self.path} is not a checkpoint written by maas")
        try:
            with path.open("r", encoding="utf-8") as f:
                metadata = _metadata_from_json(json.load(f))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"checkpoint metadata {path} is malformed: {exc}") from exc
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if not isinstance(planner, SafeLoadPlanner):
            raise TypeError(
                f"SafeFileSystemReader needs planner=SafeLoadPlanner(), got {type(planner).__name__}: other planners "
                "unpickle non-tensor values (torch.load(weights_only=False))"
            )
        return super().read_data(plan, planner)


def _pickled_message(path: Path) -> str:
    return (
        f"{path} holds a pickled DCP '.metadata' and no '{METADATA_FILE}'; maas never loads pickles. "
        "Write checkpoints with maas.training.checkpoint.save (or SafeFileSystemWriter)"
    )


# --- complete-or-invisible checkpoints in a run directory --------------------------------------------------------


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
        _write_json_durably(partial / MARKER_FILE, marker)
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
        raise InvalidInput(_pickled_message(path))
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
