"""`maas deploy` and `maas deployments` as a user runs them: a real process on a real registry database."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maas.registry import Deployment, Registry
from maas.testing.models import make_linear_model

FIELDS = {
    "name",
    "max_batch_size",
    "max_queue_delay_ms",
    "preferred_batch_sizes",
    "max_queue_size",
    "instances",
    "threads",
    "revision",
    "updated_at",
}


def maas(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def refused(env: dict[str, str], *args: str) -> str:
    """The error a refused command prints: exit code 1, one message, no traceback."""
    proc = maas(env, *args, ok=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr


@pytest.fixture
def reg(registry: Registry, tmp_path: Path) -> Registry:
    """The registry the commands use, holding the models `digits` and `text`."""
    model = make_linear_model(tmp_path / "linear.onnx")
    registry.register(model, "digits")
    registry.register(model, "text")
    return registry


def test_deploy_show_and_list(cli_env: dict[str, str], reg: Registry) -> None:
    out = maas(cli_env, "deploy", "digits", "--max-batch-size", "32", "--preferred-batch-sizes", "16,8").stdout
    assert "Deployed digits (revision 1)" in out and "max_batch_size 1 → 32" in out and "8,16" in out

    deployed = json.loads(
        maas(cli_env, "deploy", "digits", "--max-queue-delay-ms", "5", "--threads", "4", "--json").stdout
    )
    assert set(deployed) == FIELDS | {"changed"}
    assert deployed["changed"] == ["max_queue_delay_ms", "threads"]
    assert (deployed["max_batch_size"], deployed["preferred_batch_sizes"]) == (32, [8, 16])  # kept
    assert (deployed["max_queue_delay_ms"], deployed["threads"], deployed["revision"]) == (5.0, 4, 2)
    assert reg.get_deployment("digits").to_dict() == {k: v for k, v in deployed.items() if k != "changed"}

    again = json.loads(maas(cli_env, "deploy", "digits", "--threads", "default", "--json").stdout)
    assert (again["threads"], again["changed"], again["revision"]) == (None, ["threads"], 3)
    assert "No change" in maas(cli_env, "deploy", "digits", "--max-batch-size", "32").stdout

    shown = json.loads(maas(cli_env, "deployments", "show", "digits", "--json").stdout)
    assert shown == reg.get_deployment("digits").to_dict() and set(shown) == FIELDS
    never = json.loads(maas(cli_env, "deployments", "show", "text", "--json").stdout)
    assert never == Deployment("text").to_dict()
    assert "not deployed" in maas(cli_env, "deployments", "show", "text").stdout

    listed = json.loads(maas(cli_env, "deployments", "list", "--json").stdout)
    assert [d["name"] for d in listed] == ["digits"] and listed[0] == shown
    table = maas(cli_env, "deployments", "list").stdout
    assert "digits" in table and "32" in table and "8,16" in table

    reset = json.loads(maas(cli_env, "deploy", "digits", "--reset", "--instances", "2", "--json").stdout)
    settings = {k: v for k, v in reset.items() if k not in ("revision", "updated_at", "changed")}
    assert settings == {k: v for k, v in Deployment("digits", instances=2).to_dict().items() if k in settings}
    assert reset["revision"] == 4
    assert reset["changed"] == ["max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes", "instances"]


def test_deploy_from_a_yaml_file(cli_env: dict[str, str], reg: Registry, tmp_path: Path) -> None:
    one = tmp_path / "one.yaml"
    one.write_text("name: digits\nmax_batch_size: 16\nthreads: 2\n")
    assert "Deployed digits (revision 1)" in maas(cli_env, "deploy", "-f", str(one)).stdout

    many = tmp_path / "many.yaml"
    many.write_text(
        "deployments:\n"
        "  - name: digits\n"
        "    preferred_batch_sizes: [4, 8]\n"
        "  - name: text\n"
        "    max_queue_size: 32\n"
        "    instances: 2\n"
    )
    out = json.loads(maas(cli_env, "deploy", "-f", str(many), "--json").stdout)
    assert [(d["name"], d["revision"], d["changed"]) for d in out] == [
        ("digits", 2, ["preferred_batch_sizes"]),
        ("text", 1, ["max_queue_size", "instances"]),
    ]
    assert all(set(d) == FIELDS | {"changed"} for d in out)
    assert reg.get_deployment("digits").max_batch_size == 16  # the file changed only what it named
    assert [d.name for d in reg.list_deployments()] == ["digits", "text"]


def test_a_bad_key_in_the_file_is_named_with_its_line(cli_env: dict[str, str], reg: Registry, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployments:\n  - name: digits\n    max_batch_size: 8\n    max_qeue_size: 3\n")
    err = refused(cli_env, "deploy", "-f", str(bad))
    assert f"{bad} is not a valid deployment file" in err
    assert "line 4: unknown key 'deployments.0.max_qeue_size' (did you mean 'max_queue_size'?)" in err
    assert "valid keys: name, max_batch_size, max_queue_delay_ms" in err
    bad.write_text("name: digits\nmax_batch_size: 5000\n")
    assert "line 2: max_batch_size: must be from 1 to 4096, got 5000" in refused(cli_env, "deploy", "-f", str(bad))
    assert reg.list_deployments() == []


def test_unknown_models_and_bad_values_change_nothing(cli_env: dict[str, str], reg: Registry, tmp_path: Path) -> None:
    assert "model 'nope' is not registered" in refused(cli_env, "deploy", "nope", "--max-batch-size", "8")
    assert "model 'nope' is not registered" in refused(cli_env, "deployments", "show", "nope")
    partly = tmp_path / "partly.yaml"
    partly.write_text("deployments:\n  - name: digits\n    instances: 2\n  - name: nope\n    instances: 2\n")
    assert "model 'nope' is not registered" in refused(cli_env, "deploy", "-f", str(partly))
    assert reg.list_deployments() == []  # checked before the first change

    assert "instances must be from 1 to 64, got 0" in refused(cli_env, "deploy", "digits", "--instances", "0")
    err = refused(cli_env, "deploy", "digits", "--max-batch-size", "4", "--preferred-batch-sizes", "8")
    assert "preferred_batch_sizes [8] has 8, above max_batch_size 4" in err
    err = refused(cli_env, "deploy", "digits", "--max-queue-delay-ms", "20000")
    assert "max_queue_delay_ms must be from 0 to 10000 milliseconds, got 20000" in err
    assert "--threads 'many' is not an integer" in refused(cli_env, "deploy", "digits", "--threads", "many")
    assert "no settings given" in refused(cli_env, "deploy", "digits")
    assert "not both" in refused(cli_env, "deploy", "digits", "-f", str(partly))
    assert reg.list_deployments() == []
