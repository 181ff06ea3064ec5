"""Checkpoints across two real gloo processes: each rank saves a DDP model and reloads it into a fresh one."""

from __future__ import annotations

import contextlib
import copy
import datetime
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from maas.errors import NotFound
from maas.testing.server import free_port
from maas.training.checkpoint import agreed_latest, latest, load, rng_state, save

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
ROOT = Path(__file__).resolve().parents[2]


def _ddp(seed: int) -> tuple[DDP, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


@contextlib.contextmanager
def _gloo(rank: int, port: int) -> Iterator[None]:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, port: int, run_dir: str) -> None:
    with _gloo(rank, port):
        model, optim = _ddp(seed=0)
        torch.manual_seed(100 + rank)  # each rank sees its own data, as in real data-parallel training
        for _ in range(2):
            optim.zero_grad()
            model(torch.randn(6, 4)).pow(2).sum().backward()
            optim.step()
        msd, osd = get_state_dict(model, optim)
        rng_key = f"rng_rank{rank}"  # per-rank values need per-rank keys: DCP keeps one copy of a shared key
        state = {"model": msd, "optim": osd, "loop": {"step": 2}, rng_key: rng_state()}
        expected = copy.deepcopy(state)

        save(Path(run_dir), 1, state, keep=1)
        path = save(Path(run_dir), 2, state, keep=1)
        found = latest(Path(run_dir))
        assert found == (2, path), found
        assert agreed_latest(Path(run_dir)) == found  # every rank sees the folder rank 0 chose

        fresh, fresh_optim = _ddp(seed=1)
        fmsd, fosd = get_state_dict(fresh, fresh_optim)
        target = {"model": fmsd, "optim": fosd, "loop": {"step": 0}, rng_key: rng_state()}
        load(path, target)
        _assert_equal(expected, target)  # before set_state_dict, which renames keys in the dicts it is given
        set_state_dict(fresh, fresh_optim, model_state_dict=target["model"], optim_state_dict=target["optim"])
        for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(p, q)
        _assert_equal(get_state_dict(model, optim)[1], get_state_dict(fresh, fresh_optim)[1], "optim")
        dist.barrier()


def _unshared_worker(rank: int, port: int, base: str) -> None:
    """Each rank with its own run folder, as two machines without shared storage would have."""
    with _gloo(rank, port):
        run_dir = Path(base) / f"node{rank}"
        model, optim = _ddp(seed=0)
        msd, osd = get_state_dict(model, optim)
        save(run_dir, 1, {"model": msd, "optim": osd, "loop": {"step": 1}}, keep=1)
        # Rank 0 published in its folder; rank 1's share could never be resumed from and is gone.
        assert not (run_dir / "checkpoints" / "step-00000001.partial").exists()
        try:
            agreed_latest(run_dir)
        except NotFound as exc:  # on both ranks: none may wait in a load the other never starts
            assert "rank(s) [1] cannot see" in str(exc) and "every rank must see the same folder" in str(exc), exc
        else:
            raise AssertionError("agreed_latest accepted a checkpoint that rank 1 cannot read")
        dist.barrier()


#: Two gloo ranks on CPU finish in seconds; the rest is room for a loaded machine.
RANKS_TIMEOUT_S = 150


def _run_ranks(worker: str, path: Path) -> None:
    # Plain subprocesses rather than mp.spawn: each rank's stderr comes back, and nothing is exchanged by pickle.
    port = free_port()
    code = f"import sys; from tests.integration.test_checkpoint_distributed import {worker}; "
    code += f"{worker}(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(rank), str(port), str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    outputs: list[str] = []
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    timed_out = False
    try:
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        # Every rank's output, also after a kill: communicate() closes the pipes, so nothing leaks into later tests.
        for proc in procs[len(outputs) :]:
            outputs.append(proc.communicate()[0] or "")
    report = "\n".join(
        f"--- rank {rank} (exit {proc.returncode}):\n{out}"
        for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True))
    )
    assert not timed_out, f"the ranks did not finish within {RANKS_TIMEOUT_S} s:\n{report}"
    for proc in procs:
        assert proc.returncode == 0, report


@pytest.mark.timeout(300)
def test_two_ranks_save_and_reload_a_ddp_model(tmp_path: Path) -> None:
    _run_ranks("_worker", tmp_path)

    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000002"]  # keep=1 pruned step 1
    files = {p.name for p in (root / "step-00000002").iterdir()}
    assert {".metadata.json", "COMPLETE"} <= files and ".metadata" not in files
    assert any(name.startswith("__1_") for name in files), files  # rank 1 wrote its own share


@pytest.mark.timeout(300)
def test_ranks_that_do_not_share_a_run_folder_fail_together_with_the_fix(tmp_path: Path) -> None:
    _run_ranks("_unshared_worker", tmp_path)
    assert [p.name for p in (tmp_path / "node0" / "checkpoints").iterdir()] == ["step-00000001"]
    assert list((tmp_path / "node1" / "checkpoints").iterdir()) == []
