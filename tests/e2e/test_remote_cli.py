"""The `maas` command against a real server (MAAS_SERVER_URL, MAAS_API_KEY) with auth required: a publisher key
registers, aliases, rolls back and deploys with the same output as the local commands; a consumer key is refused
with one clear line; commands that only work on a local registry say so."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer, free_port


def maas(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def refused(env: dict[str, str], *args: str) -> str:
    """The error a refused command prints: exit code 1, one line, no traceback."""
    proc = maas(env, *args, ok=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
    return " ".join(proc.stderr.split())


def shape(value: Any) -> Any:
    """The keys and types of a JSON value, recursively: what programs reading `--json` rely on."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


@pytest.fixture
def remote(cli_env: dict[str, str], home: Path, tmp_path: Path) -> Iterator[tuple[RemoteServer, dict[str, str]]]:
    """A server over `home` requiring keys, and the environment of a client machine that points the CLI at it (its
    own MAAS_HOME, which remote commands must never touch), with an admin key made locally on the server."""
    admin = json.loads(maas(cli_env, "keys", "create", "--name", "ops", "--role", "admin", "--json").stdout)
    server_env = {"MAAS_AUTH": "required", "MAAS_AUTH_CACHE_S": "0"}  # a revoked key fails at once
    with RemoteServer(home, args=["--no-grpc", "--model", "digits"], env=server_env) as srv:
        client_home = tmp_path / "client-home"
        env = {**cli_env, "MAAS_HOME": str(client_home), "MAAS_SERVER_URL": srv.url, "MAAS_API_KEY": admin["key"]}
        yield srv, env
    assert not (client_home / "maas.db").exists()


def test_a_publisher_works_remotely_as_locally_and_a_consumer_is_refused(
    remote: tuple[RemoteServer, dict[str, str]], cli_env: dict[str, str], tmp_path: Path
) -> None:
    srv, admin = remote
    a = make_linear_model(tmp_path / "a.onnx")
    b = make_linear_model(tmp_path / "b.onnx", seed=1)
    made = {
        role: json.loads(
            maas(admin, "keys", "create", "--name", role, "--role", role, "--models", "digits*", "--json").stdout
        )
        for role in ("publisher", "consumer")
    }
    assert {k["role"] for k in made.values()} == {"publisher", "consumer"}
    pub = {**admin, "MAAS_API_KEY": made["publisher"]["key"]}
    con = {**admin, "MAAS_API_KEY": made["consumer"]["key"]}
    local = {**cli_env, "MAAS_HOME": str(tmp_path / "local-home")}

    register = ["models", "register", str(a), "--name", "digits", "--alias", "production", "--tag", "team=vision"]
    v1 = json.loads(maas(pub, *register, "--json").stdout)
    here = json.loads(maas(local, *register, "--json").stdout)
    assert shape(v1) == shape(here)
    assert {k: v for k, v in v1.items() if k not in ("created_at", "lineage")} == {
        k: v for k, v in here.items() if k not in ("created_at", "lineage")
    }
    assert v1["lineage"]["creator"] == f"key:{made['publisher']['id']}"
    out = maas(pub, "models", "register", str(b), "--name", "digits", "--metric", "acc=0.9").stdout
    assert "Registered models:/digits/2 (onnx" in out and "digest    sha256:" in out

    assert maas(pub, "models", "alias", "set", "digits", "production", "2").stdout.strip() == (
        "digits@production → 2 (was 1)"
    )
    assert maas(pub, "models", "rollback", "digits").stdout.strip() == "rolled back digits@production: 2 → 1"
    assert json.loads(maas(pub, "models", "show", "digits@production", "--json").stdout)["version"] == 1
    shown = json.loads(maas(pub, "models", "show", "digits", "--json").stdout)
    assert [(v["version"], v["metrics"]) for v in shown["versions"]] == [(1, {}), (2, {"acc": 0.9})]
    history = json.loads(maas(pub, "models", "alias", "history", "digits", "--json").stdout)
    assert [(e["action"], e["from_version"], e["to_version"]) for e in history] == [
        ("set", None, 1),
        ("set", 1, 2),
        ("rollback", 2, 1),
    ]

    deployed = json.loads(maas(pub, "deploy", "digits", "--max-batch-size", "8", "--json").stdout)
    assert shape(deployed) == shape(
        json.loads(maas(local, "deploy", "digits", "--max-batch-size", "8", "--json").stdout)
    )
    assert (deployed["max_batch_size"], deployed["revision"], deployed["changed"]) == (8, 1, ["max_batch_size"])
    assert "digits: revision 1" in maas(pub, "deployments", "show", "digits").stdout
    listed = json.loads(maas(con, "models", "list", "--json").stdout)
    assert [(m["name"], m["version_count"], m["aliases"]) for m in listed] == [("digits", 2, {"production": 1})]

    # The consumer reads its model, changes nothing, and never learns of a model outside its patterns.
    for args in (
        ["models", "register", str(a), "--name", "digits"],
        ["models", "alias", "set", "digits", "production", "2"],
        ["models", "rollback", "digits"],
        ["models", "delete", "digits/2", "--force"],
        ["deploy", "digits", "--max-batch-size", "2"],
        ["keys", "list"],
    ):
        err = refused(con, *args)
        assert "HTTP 403" in err and srv.url in err, (args, err)
    assert "is not registered" in refused(con, "models", "show", "other")
    assert json.loads(maas(con, "models", "show", "digits@production", "--json").stdout)["version"] == 1
    assert "HTTP 403" in refused(pub, "models", "register", str(a), "--name", "other")

    assert "runs with the defaults now" in maas(pub, "deployments", "delete", "digits").stdout
    assert maas(pub, "models", "delete", "digits/1", "--force").stdout.strip() == "deleted models:/digits/1"
    assert json.loads(maas(admin, "keys", "revoke", made["consumer"]["id"], "--json").stdout)["state"] == "revoked"
    assert "revoked" in refused(con, "models", "list")


def test_remote_refusals_are_clear(remote: tuple[RemoteServer, dict[str, str]]) -> None:
    srv, admin = remote
    assert "requires an API key" in refused({**admin, "MAAS_API_KEY": ""}, "models", "list")
    assert "not valid" in refused({**admin, "MAAS_API_KEY": "maas_nope"}, "models", "list")
    err = refused(admin, "models", "verify")
    assert "acts only on the local registry" in err and srv.url in err
    closed = f"http://127.0.0.1:{free_port()}"
    assert "cannot reach the maas server at " + closed in refused(
        {**admin, "MAAS_SERVER_URL": closed}, "models", "list"
    )
    assert "not an http(s) URL" in refused({**admin, "MAAS_SERVER_URL": "ftp://x"}, "models", "list")
    assert "No models registered yet" in maas(admin, "models", "list").stdout


def test_a_model_directory_is_uploaded_as_the_file_the_registry_stores(
    remote: tuple[RemoteServer, dict[str, str]], cli_env: dict[str, str], tiny_llm_dir: Path, tmp_path: Path
) -> None:
    _, admin = remote
    there = json.loads(maas(admin, "models", "register", str(tiny_llm_dir), "--name", "tiny", "--json").stdout)
    local = {**cli_env, "MAAS_HOME": str(tmp_path / "local-home")}
    here = json.loads(maas(local, "models", "register", str(tiny_llm_dir), "--name", "tiny", "--json").stdout)
    assert (there["format"], there["artifact_digest"], there["signature"]) == (
        here["format"],
        here["artifact_digest"],
        here["signature"],
    )
