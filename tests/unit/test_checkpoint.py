"""Checkpoints in one process: exact round trips, crash safety, pruning, and no pickle on the way back in."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from maas.errors import Conflict, InvalidInput, NotFound
from maas.training import checkpoint
from maas.training.checkpoint import (
    METADATA_FILE,
    SafeFileSystemReader,
    SafeFileSystemWriter,
    SafeLoadPlanner,
    latest,
    load,
    rng_state,
    save,
    set_rng_state,
)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model(seed)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        optim.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optim.step()
    return model, optim


def _state(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd, "loop": {"step": step, "epoch": 1, "name": "run-a", "lrs": [0.1, 0.01]}}


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _draws() -> tuple[Any, ...]:
    return torch.rand(3), random.random(), np.random.rand(2).tolist(), np.random.randn()


def test_round_trip_model_optimizer_loop_and_rng(tmp_path: Path) -> None:
    model, optim = _trained()
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    state = {**_state(model, optim, step=7), "rng": rng_state()}
    expected = copy.deepcopy(state)
    expected_draws = _draws()

    path = save(tmp_path, 7, state)
    assert path == tmp_path / "checkpoints" / "step-00000007"

    fresh_model = _model(seed=1)
    fresh_optim = torch.optim.Adam(fresh_model.parameters(), lr=0.5)
    target = {**_state(fresh_model, fresh_optim, step=0), "rng": rng_state()}
    target["loop"] = {"step": 0, "epoch": 0, "name": "", "lrs": []}
    load(path, target)
    _assert_same(expected, target)

    set_state_dict(fresh_model, fresh_optim, model_state_dict=target["model"], optim_state_dict=target["optim"])
    for p, q in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(p, q)
    _assert_same(optim.state_dict(), fresh_optim.state_dict())
    set_rng_state(target["rng"])
    _assert_same(expected_draws, _draws())


def test_metadata_is_json_and_no_pickle_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optim = _trained()
    path = save(tmp_path, 1, _state(model, optim, step=1))
    assert not (path / ".metadata").exists()
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["format"] == "maas.dcp-metadata"
    assert meta["state_dict_metadata"]["loop.step"] == {"type": "bytes"}

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used while loading a checkpoint")

    class RefusingUnpickler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse()

    torch_load = torch.load
    weights_only: list[Any] = []

    def spy_load(*args: Any, **kwargs: Any) -> Any:
        weights_only.append(kwargs.get("weights_only"))
        return torch_load(*args, **kwargs)

    fresh = _model(seed=1)
    target = _state(fresh, torch.optim.Adam(fresh.parameters()), step=0)
    with monkeypatch.context() as m:
        m.setattr(pickle, "load", refuse)
        m.setattr(pickle, "loads", refuse)
        m.setattr(pickle, "Unpickler", RefusingUnpickler)
        m.setattr(torch, "load", spy_load)
        load(path, target)
    assert target["loop"]["step"] == 1
    assert weights_only and all(w is True for w in weights_only)


def test_metadata_json_round_trips_every_field(tmp_path: Path) -> None:
    # Guards a torch upgrade: a new Metadata/_StorageInfo field would otherwise be dropped silently.
    assert {f.name for f in dataclasses.fields(Metadata)} == {
        "state_dict_metadata",
        "planner_data",
        "storage_data",
        "storage_meta",
        "version",
    }
    assert {f.name for f in dataclasses.fields(_StorageInfo)} == {
        "relative_path",
        "offset",
        "length",
        "transform_descriptors",
    }
    model, optim = _trained()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        written = dcp.save(_state(model, optim, step=3), storage_writer=SafeFileSystemWriter(tmp_path))
    read = SafeFileSystemReader(tmp_path).read_metadata()
    assert read.storage_meta is not None and written.storage_meta is not None
    assert read.storage_meta.load_id is not None
    read.storage_meta = StorageMeta(**{**vars(read.storage_meta), "load_id": None, "checkpoint_id": tmp_path})
    assert read == written
    assert [i.index for i in read.storage_data] == [i.index for i in written.storage_data]


def test_reader_refuses_pickled_metadata(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        dcp.save({"w": torch.ones(2)}, storage_writer=FileSystemWriter(tmp_path))
    assert (tmp_path / ".metadata").is_file()
    (tmp_path / "COMPLETE").write_text(json.dumps({"step": 0}))
    with pytest.raises(InvalidInput, match="pickled"):
        load(tmp_path, {"w": torch.zeros(2)})
    with pytest.raises(InvalidInput, match="pickled"):
        SafeFileSystemReader(tmp_path).read_metadata()


def test_reader_refuses_the_unpickling_planner(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    path = save(tmp_path, 1, {"w": torch.ones(2)})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        with pytest.raises(BaseException, match="SafeLoadPlanner"):  # DCP's CheckpointException is a BaseException
            dcp.load({"w": torch.zeros(2)}, storage_reader=SafeFileSystemReader(path), planner=DefaultLoadPlanner())
        target = {"w": torch.zeros(2)}
        dcp.load(target, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    assert torch.equal(target["w"], torch.ones(2))


_ran: list[str] = []


def _side_effect() -> str:
    _ran.append("ran")
    return "gotcha"


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_side_effect, ())


def test_non_tensor_values_are_not_unpickled_freely(tmp_path: Path) -> None:
    path = save(tmp_path, 1, {"x": _Evil()})
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        load(path, {"x": 0})
    assert _ran == []


def test_crash_while_writing_is_never_latest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = save(tmp_path, 1, {"w": torch.ones(2)})

    def crash(self: SafeFileSystemWriter, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")  # data files are written, the metadata is not

    with monkeypatch.context() as m:
        m.setattr(SafeFileSystemWriter, "finish", crash)
        with pytest.raises(OSError, match="disk full"):
            save(tmp_path, 2, {"w": torch.full((2,), 2.0)})
    partial = tmp_path / "checkpoints" / "step-00000002.partial"
    assert any(partial.glob("*.distcp"))
    assert latest(tmp_path) == (1, first)

    def crash_before_rename(*args: Any, **kwargs: Any) -> None:
        raise OSError("killed")  # DCP finished, the marker and rename did not happen

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_fsync_dir", crash_before_rename)
        with pytest.raises(OSError, match="killed"):
            save(tmp_path, 3, {"w": torch.full((2,), 3.0)})
    assert (tmp_path / "checkpoints" / "step-00000003.partial" / METADATA_FILE).is_file()
    (tmp_path / "checkpoints" / "step-00000009").mkdir()  # a folder without the marker
    assert latest(tmp_path) == (1, first)
    with pytest.raises(NotFound, match="COMPLETE"):
        load(tmp_path / "checkpoints" / "step-00000003.partial", {"w": torch.zeros(2)})

    # Saving the crashed step again works, and the leftovers are cleaned up.
    path = save(tmp_path, 3, {"w": torch.full((2,), 3.0)}, keep=None)
    assert latest(tmp_path) == (3, path)
    assert not list((tmp_path / "checkpoints").glob("*.partial"))
    target = {"w": torch.zeros(2)}
    load(path, target)
    assert torch.equal(target["w"], torch.full((2,), 3.0))


def test_keep_prunes_oldest(tmp_path: Path) -> None:
    for step in range(1, 5):
        save(tmp_path, step, {"w": torch.full((2,), float(step))}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004"]
    save(tmp_path, 5, {"w": torch.ones(2)}, keep=None)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3


def test_saving_a_step_twice_is_a_conflict(tmp_path: Path) -> None:
    save(tmp_path, 1, {"w": torch.ones(2)})
    with pytest.raises(Conflict, match="step 1"):
        save(tmp_path, 1, {"w": torch.zeros(2)})
    with pytest.raises(InvalidInput, match="keep"):
        save(tmp_path, 2, {"w": torch.zeros(2)}, keep=0)


def test_latest_of_an_empty_run_is_none(tmp_path: Path) -> None:
    assert latest(tmp_path) is None
