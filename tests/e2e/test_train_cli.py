"""`maas train` refuses a bad config before any process starts, and records no run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maas.registry import Registry


@pytest.mark.parametrize(
    ("cfg", "args", "words"),
    [
        ({"bogus": 1}, [], "unknown key 'bogus'"),
        ({"strategy": {"name": "allreduce"}}, [], "'single', 'ddp'"),
        ({"model": {"factory": "no_such_pkg.models:mlp"}}, [], "cannot import module 'no_such_pkg.models'"),
        ({}, ["--nproc-per-node", "2"], "strategy single runs on one process"),
    ],
)
def test_bad_config_fails_before_launch(
    home: Path, tmp_path: Path, cli_env: dict[str, str], cfg: dict[str, object], args: list[str], words: str
) -> None:
    base = {
        "model": {"factory": "maas.demo.digits:mlp"},
        "data": {"train": "maas.demo.digits:train_dataset"},
        "batch_size": 64,
        "steps": 5,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**base, **cfg}))
    proc = subprocess.run(
        [sys.executable, "-m", "maas", "train", str(path), *args],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "runs").exists()
    if (home / "maas.db").exists():
        assert Registry().runs.list_runs() == []


def test_resume_of_unknown_run(cli_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "maas", "train", "--resume", "abcdef12"],
        env={**os.environ, **cli_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "abcdef12" in proc.stderr, proc.stderr
