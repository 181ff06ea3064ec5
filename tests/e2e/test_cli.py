"""The `maas` command as a user runs it: output, exit codes, messages, and what it imports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maas.testing.models import make_linear_model, make_multi_io_model

HEAVY = ("torch", "onnx", "onnxruntime")


def maas(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("args", [["--help"], ["models", "list"], ["models", "list", "--json"], ["models", "--help"]])
def test_light_commands_import_no_ml_framework(cli_env: dict[str, str], args: list[str]) -> None:
    code = (
        "import sys\n"
        "from maas.cli.main import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_model_lifecycle_through_the_cli(cli_env: dict[str, str], tmp_path: Path) -> None:
    a = make_multi_io_model(tmp_path / "a.onnx", scale=1.0)
    b = make_multi_io_model(tmp_path / "b.onnx", scale=2.0)
    out = maas(cli_env, "models", "register", str(a), "--name", "m", "--alias", "production", "--tag", "k=v", "--json")
    v1 = json.loads(out.stdout)
    assert v1["version"] == 1 and v1["aliases"] == ["production"] and v1["tags"] == {"k": "v"}
    maas(cli_env, "models", "register", str(b), "--name", "m", "--metric", "accuracy=0.5")

    models = json.loads(maas(cli_env, "models", "list", "--json").stdout)
    assert [(m["name"], m["version_count"], m["latest_version"], m["aliases"]) for m in models] == [
        ("m", 2, 2, {"production": 1})
    ]
    shown = json.loads(maas(cli_env, "models", "show", "m", "--json").stdout)
    assert [v["version"] for v in shown["versions"]] == [1, 2]
    assert json.loads(maas(cli_env, "models", "show", "models:/m/2", "--json").stdout)["metrics"] == {"accuracy": 0.5}

    maas(cli_env, "models", "alias", "set", "m", "production", "2")
    assert json.loads(maas(cli_env, "models", "show", "m@production", "--json").stdout)["version"] == 2
    maas(cli_env, "models", "rollback", "m")
    assert json.loads(maas(cli_env, "models", "show", "m@production", "--json").stdout)["version"] == 1
    history = json.loads(maas(cli_env, "models", "alias", "history", "m", "--json").stdout)
    assert [(e["action"], e["from_version"], e["to_version"]) for e in history] == [
        ("set", None, 1),
        ("set", 1, 2),
        ("rollback", 2, 1),
    ]

    refused = maas(cli_env, "models", "delete", "m/1", ok=False)
    assert refused.returncode == 1 and "production" in refused.stderr and "--force" in refused.stderr
    maas(cli_env, "models", "delete", "m/2")
    maas(cli_env, "models", "alias", "delete", "m", "production")
    maas(cli_env, "models", "delete", "m/1")
    assert json.loads(maas(cli_env, "models", "show", "m", "--json").stdout)["versions"] == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["models", "show", "nope"], "not registered"),
        (["models", "show", "../etc/passwd"], "invalid model"),
        (["models", "register", "missing.onnx", "--name", "x"], "does not exist"),
        (["models", "register", "{model}", "--name", "a/b"], "invalid model name"),
        (["models", "register", "{model}", "--name", "x", "--tag", "novalue"], "KEY=VALUE"),
        (["models", "alias", "set", "lin", "Prod", "1"], "invalid alias"),
        (["models", "alias", "set", "lin", "production", "7"], "no version 7"),
        (["models", "rollback", "lin"], "no alias 'production'"),
        (["models", "delete", "lin"], "names no version"),
    ],
)
def test_bad_input_gets_a_message_not_a_traceback(
    cli_env: dict[str, str], tmp_path: Path, args: list[str], words: str
) -> None:
    model = make_linear_model(tmp_path / "lin.onnx")
    maas(cli_env, "models", "register", str(model), "--name", "lin")
    proc = maas(cli_env, *[a.replace("{model}", str(model)) for a in args], ok=False)
    assert proc.returncode != 0
    assert words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
