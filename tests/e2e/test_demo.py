"""`maas demo --smoke`: the main job end to end on the embedded default."""

import re
import sys
from pathlib import Path

import pytest

from maas.registry import Registry
from maas.testing import processes

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_demo_smoke_serves_an_accurate_model(home: Path, cli_env: dict[str, str]) -> None:
    proc = processes.run(
        [sys.executable, "-m", "maas", "demo", "--smoke", "--port", "0"], env=cli_env, text=True, timeout=780
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"accuracy measured through the server: ([0-9.]+) \((\d+) of (\d+) test images\)", proc.stdout)
    assert match, proc.stdout
    served = int(match.group(2)) / int(match.group(3))
    assert served >= 0.9
    reg = Registry()
    mv = reg.resolve("models:/digits@production")
    assert mv.version == 1 and mv.format == "onnx"
    run = reg.runs.get_run(mv.lineage.source_run or "")
    assert run.strategy == "ddp" and run.world_size == 2 and run.status == "succeeded"
    # The server's accuracy is the one the run measured in-process (ONNX vs torch may flip one near-tie).
    assert abs(served - mv.metrics["accuracy"]) <= 1 / int(match.group(3))
