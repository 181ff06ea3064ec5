"""`maas train` on two hosts (network namespaces a and b, one worker each), met by a c10d rendezvous on a's address,
against two workers on one host that never stopped: the same parameters, bit for bit, also when a worker on b is
SIGKILLed mid-run and the elastic agents restart both workers from the last checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.training_support import (
    ROOT,
    assert_same_params,
    final_params,
    finished,
    kill_a_worker_after_checkpoint,
    only_run,
)
from tests.netns import IFNAME, Host, Network

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RDZV_PORT = 29400
CFG: dict[str, Any] = {
    "model": {"factory": "maas.demo.digits:mlp", "kwargs": {"hidden": 32}},
    "data": {"train": "maas.demo.digits:train_dataset", "eval": "maas.demo.digits:test_dataset"},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0001},
    "steps": 300,  # as many as the one-host test: a fast machine must not finish before the kill lands
    "batch_size": 64,
    "seed": 3,
    "deterministic": True,
    "eval": {"metric": "accuracy"},
    "strategy": {"name": "ddp"},
    "checkpoint": {"every_steps": 60, "keep": 2},
    "log_every": 10,
}


def start(host: Host, home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``maas train CFG ARGS`` inside ``host`` with ``MAAS_HOME=home``, one thread per worker (sums in one order)."""
    path = home.with_name(f"{home.name}-{time.monotonic_ns()}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(CFG))
    full_env = {**os.environ, "MAAS_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    command = host.command([sys.executable, "-m", "maas", "train", str(path), *args])
    return subprocess.Popen(
        command, env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def two_hosts(net: Network, tmp: Path, *extra: str) -> tuple[list[Path], Path, list[subprocess.Popen[str]]]:
    """One agent on a (hosting the rendezvous) and one on b, a MAAS_HOME each, one shared runs folder (the
    shared filesystem the README asks for); gloo told which interface to use, each agent its own address."""
    homes, runs = [tmp / "host-a", tmp / "host-b"], tmp / "shared-runs"
    endpoint = f"{net['a'].address}:{RDZV_PORT}"
    env = {"MAAS_RUNS_DIR": str(runs), "GLOO_SOCKET_IFNAME": IFNAME}
    common = ("--nnodes", "2", "--rdzv-endpoint", endpoint, *extra)
    nodes = [
        start(net["a"], homes[0], *common, "--local-addr", net["a"].address, "--rdzv-conf", "is_host=1", env=env),
        start(net["b"], homes[1], *common, "--local-addr", net["b"].address, env=env),
    ]
    return homes, runs, nodes


def one_run_on_both(homes: Sequence[Path], outputs: Sequence[str]) -> Any:
    records = [only_run(home) for home in homes]
    run = next(r for r in records if r.eval_metrics.get("accuracy") is not None)  # the reporting node's copy
    assert {r.id for r in records} == {run.id} and all(run.id in out for out in outputs)
    assert all(r.status == "succeeded" and r.world_size == 2 for r in records)
    assert run.last_step == CFG["steps"] and run.eval_metrics["accuracy"] > 0.85
    return run


@pytest.fixture
def one_host(network: Callable[[Sequence[str]], Network], tmp_path: Path) -> tuple[Network, Any]:
    """Hosts a and b; the reference: two workers on host a alone, uninterrupted, and their final parameters."""
    net = network(["a", "b"])
    home = tmp_path / "one-host"
    finished(start(net["a"], home, "--nproc-per-node", "2"))
    return net, final_params(home, only_run(home).id)


def test_two_hosts_train_the_parameters_of_one(one_host: tuple[Network, Any], tmp_path: Path) -> None:
    net, want = one_host
    homes, runs, nodes = two_hosts(net, tmp_path)
    outputs = [finished(node) for node in nodes]
    run = one_run_on_both(homes, outputs)
    assert_same_params(final_params(homes[0], run.id, runs=runs), want, atol=0)

    # With a worker on b SIGKILLed after the first checkpoint, both agents restart their workers, which resume
    # from that checkpoint and end exactly where the uninterrupted runs did.
    homes, runs, nodes = two_hosts(net, tmp_path / "killed", "--max-restarts", "1")
    kill_a_worker_after_checkpoint(homes[1], nodes[1], runs)
    outputs = [finished(node, timeout=400) for node in nodes]
    assert "terminated with signal SIGKILL" in outputs[1], outputs[1]
    run = one_run_on_both(homes, outputs)
    assert_same_params(final_params(homes[0], run.id, runs=runs), want, atol=0)
