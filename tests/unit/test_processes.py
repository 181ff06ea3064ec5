"""maas.testing.processes: a test's child processes, background jobs included, never outlive it."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from maas.testing import processes


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_background_jobs_die_with_a_finished_command() -> None:
    done = processes.run(["bash", "-c", "sleep 300 & echo $!"], text=True, timeout=30)
    assert done.returncode == 0
    assert _gone(int(done.stdout.strip()))


def test_a_timeout_kills_the_whole_group() -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        processes.run(["bash", "-c", "sleep 300 & echo $!; sleep 300"], text=True, timeout=1)
    assert time.monotonic() - started < 15
    out = info.value.output
    assert _gone(int((out.decode() if isinstance(out, bytes) else out).strip()))
