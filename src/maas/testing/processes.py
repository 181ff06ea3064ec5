"""Child processes that never outlive their test: each runs in its own session (process group), and the whole
group is killed when it times out, when the caller fails, and when the Python process exits."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO, Any

_live: set[subprocess.Popen[Any]] = set()


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process of ``proc``'s session (its background jobs too), then reap ``proc``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    if sig == signal.SIGKILL:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        _live.discard(proc)


def popen(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` in a new session, remembered so that it is killed at interpreter exit."""
    proc: subprocess.Popen[Any] = subprocess.Popen(list(cmd), start_new_session=True, **kwargs)
    _live.add(proc)
    return proc


def run(cmd: Sequence[str], *, timeout: float, text: bool = False, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Like ``subprocess.run(..., capture_output=True)``, but it returns when ``cmd`` exits (not when the last
    background job closes its output), and then, on a timeout or on any error, kills the whole process group:
    a shell's background ``maas serve`` dies with it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = popen(cmd, stdout=out, stderr=err, **kwargs)
        try:
            proc.wait(timeout=timeout)
        except BaseException as exc:
            kill_group(proc)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(proc.args, timeout, _read(out, text), _read(err, text)) from None
            raise
        kill_group(proc)  # whatever it left running in the background
        return subprocess.CompletedProcess(proc.args, proc.returncode, _read(out, text), _read(err, text))


def _read(fh: IO[bytes], text: bool) -> Any:
    fh.seek(0)
    data = fh.read()
    return data.decode(errors="replace") if text else data


@atexit.register
def _kill_all() -> None:
    for proc in list(_live):
        kill_group(proc)
