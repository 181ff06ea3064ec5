"""The Dockerfile's promises, checked without an engine to build it: a non-root user, no secret baked in, CPU torch
pinned by constraints.txt, the ports and command `maas serve` needs, and a .dockerignore that sends only the source."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_runs_as_a_non_root_user() -> None:
    final = instructions()[max(i for i, (op, _) in enumerate(instructions()) if op == "FROM") :]
    assert final[0] == ("FROM", "python:3.11-slim")
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_no_secret_is_baked_in() -> None:
    for op, arg in instructions():
        if op in ("ENV", "ARG"):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|API_KEY|DATABASE_URL|AWS_", arg, re.IGNORECASE), arg
        if op in ("COPY", "ADD"):
            assert not re.search(r"\.env|\.pem|\.key|\.maas|\.db\b", arg), arg
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything excluded first, then the source let back in
    assert not any(line.startswith("!") and (".env" in line or ".venv" in line or ".git" in line) for line in ignore)


def test_it_installs_maas_with_the_pinned_cpu_torch_and_serves_on_all_interfaces() -> None:
    ops = instructions()
    run = " ".join(arg for op, arg in ops if op == "RUN")
    assert "-c constraints.txt" in run and "download.pytorch.org/whl/cpu" in run
    assert ("EXPOSE", "8000 8001") in ops
    assert ("ENTRYPOINT", '["maas"]') in ops and ("CMD", '["serve", "--host", "0.0.0.0"]') in ops
    sources = [name for op, arg in ops if op == "COPY" and "--from" not in arg for name in arg.split()[:-1]]
    assert sources and all((ROOT / name).exists() for name in sources)
