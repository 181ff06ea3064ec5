"""What every benchmark records beside its figures: the machine, and where the results are written.

``results/<name>.json`` holds the latest run. ``results/<name>.md`` keeps one section per machine: a rerun
replaces that machine's section, so figures from different machines sit side by side.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(packages: Sequence[str] = ("onnxruntime",)) -> dict[str, Any]:
    """Platform, CPUs, Python and the versions of ``packages``, with a UTC timestamp."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count()
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "python": platform.python_version(),
        **{dist: _version(dist) for dist in packages},
    }


def machine_key(info: dict[str, Any]) -> str:
    """The label a machine's section in a ``.md`` file goes under."""
    return f"{info['cpu']}, {info['cpus_available']} CPUs, {platform.system()} {info['machine']}"


def write_json(name: str, payload: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    right = ["---:" if i else "---" for i in range(len(headers))]
    lines = [headers, right, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def write_markdown_section(name: str, title: str, key: str, body: str) -> Path:
    """Put ``body`` under ``key`` in ``results/<name>.md``, replacing an earlier section with that key."""
    path = RESULTS / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    start, end = f"<!-- machine: {key} -->", f"<!-- end: {key} -->"
    section = f"{start}\n## {key}\n\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else f"# {title}\n\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    return path
