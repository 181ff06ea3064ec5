"""What the training integration tests share: `maas train` run as a user runs it, and a run's results read back.

Every run is the real CLI in a subprocess (torchrun's elastic agent, gloo worker processes) with its own
``MAAS_HOME``; the repository root is on ``PYTHONPATH`` so configs can name test functions (losses, metrics)
by import path, as users name their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.state_dict import get_state_dict

from maas.demo.digits import mlp
from maas.registry import Registry
from maas.registry.entities import Run
from maas.training import checkpoint

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240


def start(
    home: Path, cfg: dict[str, Any] | None, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``maas train CONFIG ARGS`` with ``MAAS_HOME=home``, started (``cfg`` None: no config, e.g. with --resume)."""
    command = [sys.executable, "-m", "maas", "train"]
    if cfg is not None:
        path = home.with_name(f"{home.name}-{time.monotonic_ns()}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        command.append(str(path))
    full_env = {**os.environ, "MAAS_HOME": str(home), "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [*command, *args], env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finished(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    """Its output, once it exited 0."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"maas train did not finish in {timeout} s:\n{out}") from None
    assert proc.returncode == 0, out
    return out


def only_run(home: Path) -> Run:
    runs = Registry(home=home).runs.list_runs()
    assert len(runs) == 1, runs
    return runs[0]


def train(home: Path, cfg: dict[str, Any] | None, *args: str, env: dict[str, str] | None = None) -> Run:
    """Run ``maas train`` to its end; the one run it recorded, which succeeded."""
    finished(start(home, cfg, *args, env=env))
    run = only_run(home)
    assert run.status == "succeeded", run
    return run


def final_params(
    home: Path, run_id: str, hidden: int = 32, depth: int = 1, runs: Path | None = None
) -> dict[str, torch.Tensor]:
    """The model in the run's last complete checkpoint (under ``runs``, default ``home/runs``), read into one
    whole digits MLP (DCP merges the keys that pipeline stages hold)."""
    found = checkpoint.latest((runs or home / "runs") / run_id)
    assert found is not None, f"run {run_id} has no complete checkpoint"
    model = mlp(hidden, depth)
    model_sd, _ = get_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpoint.load(found[1], {"model": model_sd, "loop": {"step": torch.tensor(0)}})
    return {k: v.clone() for k, v in model_sd.items()}


def assert_same_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0, msg=key)


def logit_energy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """An eval metric that every parameter of the evaluated model moves."""
    return float(outputs.double().pow(2).mean())


_calls = 0


def crash_once(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cross_entropy that ends its process at call ``MAAS_TEST_CRASH_AT`` (default 13), once: the file
    ``MAAS_TEST_CRASH_MARKER`` records that it did."""
    global _calls
    _calls += 1
    marker = Path(os.environ["MAAS_TEST_CRASH_MARKER"])
    if _calls == int(os.environ.get("MAAS_TEST_CRASH_AT", "13")) and not marker.exists():
        marker.touch()
        os._exit(1)
    return torch.nn.functional.cross_entropy(output, target)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def kill_a_worker_after_checkpoint(home: Path, proc: subprocess.Popen[str], runs: Path | None = None) -> None:
    """SIGKILL one of ``proc``'s worker processes once the run has a complete checkpoint (under ``runs``,
    default ``home/runs``)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        runs_dir = runs or home / "runs"
        if runs_dir.exists() and any(checkpoint.latest(d) for d in runs_dir.iterdir()):
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    # Workers are the agent's multiprocessing-spawned children (their command line runs spawn_main).
    targets = [
        p
        for c in _children(proc.pid)
        for p in [c, *_children(c)]
        if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
    ]
    assert targets, "no worker process found"
    os.kill(targets[-1], signal.SIGKILL)
