"""The README's walkthrough, run as written (blocks marked <!-- run -->), so the docs cannot rot."""

import os
import re
import sys
from pathlib import Path

import pytest

from maas import envs
from maas.testing import processes
from maas.testing.server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- run -->\n```(bash|python)\n(.*?)```", re.S)


def readme_script(port: int, grpc_port: int) -> str:
    blocks = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(blocks) >= 3, "the README lost its runnable walkthrough"
    parts = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for lang, code in blocks:
        code = code.replace("8000", str(port)).replace("8001", str(grpc_port))
        parts.append(code if lang == "bash" else f"python - <<'PY'\n{code}PY")
    return "\n".join(parts) + "\n"


@pytest.mark.timeout(900)
def test_readme_walkthrough_runs(home: Path, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {
        **os.environ,
        "MAAS_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "200",
    }
    # 37 s on a quiet machine; the limits leave room for a loaded one, and a timeout kills the background server.
    proc = processes.run(
        ["bash", "-c", readme_script(port, free_port())], cwd=tmp_path, env=env, text=True, timeout=780
    )
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert "Registered models:/digits/1" in out and "Registered models:/digits/2" in out
    assert "rolled back digits@production: 2 → 1" in out
    assert '"model_version":"1"' in out and '"id":"42"' in out  # production is 1 after the rollback
    assert '"model_version":"2"' in out  # the explicit version route
    assert 'maas_inference_requests_total{model="digits",outcome="success",version="1"}' in out
    assert "ok, 0 failed" in out
    assert "succeeded: ddp on 2 process(es)" in out and "published models:/digits/3" in out
    assert "source run" in out


def test_readme_lists_every_setting() -> None:
    text = (ROOT / "README.md").read_text()
    for name in envs.environment_variables:
        assert f"`{name}`" in text, f"{name} is missing from the README's settings table"
