"""Two `maas serve` hosts on one PostgreSQL and one SeaweedFS, each in its own namespace: an alias moved from a
third host reaches both servers within 2 s, and both then answer from the same new artifact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from maas.testing import processes
from maas.testing.models import make_linear_model
from tests.integration.training_support import ROOT
from tests.multihost.infra import start_postgres, start_seaweedfs
from tests.netns import Host, Network

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PORT = 8000
MODEL = "linear"


def maas(host: Host, env: dict[str, str], *args: str) -> str:
    done = host.run([sys.executable, "-m", "maas", *args], timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, f"maas {' '.join(args)} on {host.name}:\n{done.stdout}"
    return done.stdout


@pytest.fixture
def shared(network: Callable[[Sequence[str]], Network], tmp_path: Path) -> Iterator[tuple[Network, dict[str, str]]]:
    """Hosts infra (PostgreSQL, SeaweedFS), a and b (servers), c (clients); the environment every maas process
    needs to use the shared registry and artifact store."""
    net = network(["infra", "a", "b", "c"])
    procs: list[subprocess.Popen[bytes]] = []
    pg_folder = None
    try:
        pg, url, pg_folder = start_postgres(net["infra"])
        procs.append(pg)
        weed_folder = tmp_path / "seaweedfs"
        weed_folder.mkdir()
        weed, s3 = start_seaweedfs(net["infra"], weed_folder)
        procs.append(weed)
        yield net, {**os.environ, "MAAS_DATABASE_URL": url, **s3, "PYTHONPATH": str(ROOT)}
    finally:
        for proc in procs:
            processes.kill_group(proc)
        if pg_folder is not None:
            shutil.rmtree(pg_folder, ignore_errors=True)


def test_two_servers_follow_one_alias_move_within_2s(shared: tuple[Network, dict[str, str]], tmp_path: Path) -> None:
    net, env = shared
    client_env = {**env, "MAAS_HOME": str(tmp_path / "client-home")}
    c = net["c"]
    maas(c, client_env, "models", "register", str(make_linear_model(tmp_path / "v1.onnx", seed=1)), "--name", MODEL)
    maas(c, client_env, "models", "register", str(make_linear_model(tmp_path / "v2.onnx", seed=2)), "--name", MODEL)
    maas(c, client_env, "models", "alias", "set", MODEL, "production", "1")
    created = maas(
        c, client_env, "keys", "create", "--name", "client", "--role", "consumer", "--models", MODEL, "--json"
    )
    key = json.loads(created)["key"]

    servers: list[subprocess.Popen[bytes]] = []
    try:
        for name in ("a", "b"):
            host = net[name]
            server_env = {**env, "MAAS_HOME": str(tmp_path / f"home-{name}")}  # its own artifact cache
            command = [sys.executable, "-m", "maas", "serve", "--host", host.address, "--port", str(PORT)]
            with (tmp_path / f"serve-{name}.log").open("wb") as log:
                servers.append(host.popen([*command, "--no-grpc"], env=server_env, cwd=ROOT, stdout=log, stderr=log))
        urls = [f"http://{net[name].address}:{PORT}" for name in ("a", "b")]
        done = c.run(
            [sys.executable, "-m", "tests.multihost.follow_alias", MODEL, key, *urls],
            timeout=240,
            env=client_env,
            cwd=ROOT,
        )
        logs = "\n".join((tmp_path / f"serve-{n}.log").read_text(errors="replace")[-3000:] for n in ("a", "b"))
        assert done.returncode == 0, f"{done.stdout}\n{logs}"
        seen = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for server in servers:
            processes.kill_group(server)

    assert seen["unauthenticated"] == 401  # off loopback, the servers require a key
    before, after = seen["before"], seen["after"]
    assert [before[u][0] for u in urls] == [1, 1] and before[urls[0]][1] == before[urls[1]][1]
    assert sorted(seen["followed_s"]) == sorted(urls), seen  # both followed the move ...
    assert max(seen["followed_s"].values()) < 2.0, seen  # ... within 2 s of its commit
    assert [after[u][0] for u in urls] == [2, 2] and after[urls[0]][1] == after[urls[1]][1] != before[urls[0]][1]
