"""Pickle-free torch.distributed.checkpoint (DCP): the global metadata as JSON, non-tensor values without pickle.

Stock DCP loads with pickle twice: ``FileSystemReader.read_metadata`` does ``pickle.load`` on ``.metadata``, and
``DefaultLoadPlanner.load_bytes`` does ``torch.load(weights_only=False)`` on every non-tensor value. Here the
metadata is JSON (``.metadata.json``) and non-tensor values go through ``torch.load(weights_only=True)`` (ints,
floats, str, None, bools, lists, tuples, dicts of those; tensor data is already read with ``weights_only=True``
by DCP itself). Where the files go, and when a checkpoint counts as complete, is :mod:`maas.training.checkpoint`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
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

from maas.errors import InvalidInput, NotFound

__all__ = [
    "METADATA_FILE",
    "PICKLED_METADATA_FILE",
    "SafeFileSystemReader",
    "SafeFileSystemWriter",
    "SafeLoadPlanner",
    "pickled_message",
    "write_json_durably",
]

METADATA_FILE = ".metadata.json"
PICKLED_METADATA_FILE = ".metadata"  # what stock DCP writes; refused on read
_FORMAT = "maas.dcp-metadata"
_FORMAT_VERSION = 1


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


def write_json_durably(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        write_json_durably(path, _metadata_to_json(metadata))


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
                raise InvalidInput(pickled_message(Path(self.path)))
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


def pickled_message(path: Path) -> str:
    """Why a checkpoint written by stock DCP (pickled metadata) is refused, and what to write instead."""
    return (
        f"{path} holds a pickled DCP '.metadata' and no '{METADATA_FILE}'; maas never loads pickles. "
        "Write checkpoints with maas.training.checkpoint.save (or SafeFileSystemWriter)"
    )
