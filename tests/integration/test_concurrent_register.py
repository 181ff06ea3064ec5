"""Several processes registering versions of one model at the same moment."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maas.registry import Registry
from maas.testing.models import make_multi_io_model

pytestmark = pytest.mark.slow


def test_eight_processes_get_versions_one_to_eight(home: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    files = [make_multi_io_model(tmp_path / f"m{i}.onnx", scale=float(i)) for i in range(8)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "maas", "models", "register", str(f), "--name", "race", "--json"],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in files
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "locked" not in err.lower()
    versions = sorted(json.loads(out)["version"] for out, _ in outs)
    assert versions == list(range(1, 9))
    reg = Registry()
    stored = reg.list_versions("race")
    assert [v.version for v in stored] == list(range(1, 9))
    assert len({v.artifact_digest for v in stored}) == 8
    assert all(r.ok for r in reg.verify("race"))
