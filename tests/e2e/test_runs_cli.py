"""`maas runs` as a user runs it against runs recorded in the registry."""

import json
import subprocess
import sys

import pytest

from maas.registry import Registry, Run

HEAVY = ("torch", "onnx", "onnxruntime")


def maas(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def runs(registry: Registry) -> list[Run]:
    """A failed single-process run, then a succeeded DDP run with steps, a checkpoint and a model."""
    failed = registry.runs.create_run({"lr": 0.1}, strategy="single", world_size=1, name="first")
    registry.runs.start_run(failed.id)
    registry.runs.finish_run(failed.id, status="failed", error="CUDA error: [out of memory]")
    good = registry.runs.create_run({"lr": 0.01, "model": {"hidden": 32}}, strategy="ddp", world_size=2, name="second")
    registry.runs.start_run(good.id)
    registry.runs.log_run_steps(good.id, [(s, 1.0 / s, 500.0, 0.01) for s in range(1, 31)])
    registry.runs.add_run_checkpoint(good.id, 30, "/ckpt/step-30")
    registry.runs.finish_run(good.id, status="succeeded", eval_metrics={"accuracy": 0.97}, model_uri="models:/digits/1")
    return [registry.runs.get_run(failed.id), registry.runs.get_run(good.id)]


def test_runs_list_and_show(cli_env: dict[str, str], runs: list[Run]) -> None:
    failed, good = runs
    listed = json.loads(maas(cli_env, "runs", "list", "--json").stdout)
    assert [(r["id"], r["status"], r["last_step"]) for r in listed] == [
        (good.id, "succeeded", 30),
        (failed.id, "failed", None),
    ]
    assert listed[0]["model_uri"] == "models:/digits/1" and listed[0]["eval_metrics"] == {"accuracy": 0.97}
    only_failed = json.loads(maas(cli_env, "runs", "list", "--status", "failed", "--json").stdout)
    assert [r["id"] for r in only_failed] == [failed.id]
    assert len(json.loads(maas(cli_env, "runs", "list", "--limit", "1", "--json").stdout)) == 1

    shown = json.loads(maas(cli_env, "runs", "show", good.id[:8], "--json").stdout)
    assert shown["id"] == good.id and shown["config"] == {"lr": 0.01, "model": {"hidden": 32}}
    assert [s["step"] for s in shown["steps"]] == list(range(1, 31))
    assert shown["checkpoints"][0]["path"] == "/ckpt/step-30" and shown["config_hash"] == good.config_hash

    table = maas(cli_env, "runs", "list").stdout
    assert good.id[:12] in table and failed.id[:12] in table and "models:/digits/1" in table
    text = maas(cli_env, "runs", "show", good.id, "--steps", "3").stdout
    assert "hidden: 32" in text and "/ckpt/step-30" in text and "accuracy=0.97" in text
    assert "last 3 of 30" in text
    assert "[out of memory]" in maas(cli_env, "runs", "show", failed.id).stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["runs", "show", "abcdef0123"], "no run with id"),
        (["runs", "show", "xyz"], "not a run id"),
        (["runs", "list", "--status", "done"], "created, running, succeeded, failed, interrupted"),
    ],
)
def test_bad_input_gets_a_message_not_a_traceback(
    cli_env: dict[str, str], runs: list[Run], args: list[str], words: str
) -> None:
    proc = maas(cli_env, *args, ok=False)
    assert proc.returncode == 1
    assert words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_runs_commands_import_no_ml_framework(cli_env: dict[str, str], runs: list[Run]) -> None:
    code = (
        "import sys\n"
        "from maas.cli.main import app\n"
        f"for args in (['runs', 'list'], ['runs', 'show', {runs[1].id!r}]):\n"
        "    try:\n        app(args)\n    except SystemExit as e:\n        assert not e.code, e.code\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
