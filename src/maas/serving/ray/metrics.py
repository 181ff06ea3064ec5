"""One ``/metrics`` for all the replicas of a local Ray, as ``--workers`` have: the replicas write their values to
files in one private directory (prometheus_client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR`` passed to them
through Ray's ``runtime_env``), so whichever replica answers a scrape counts the requests of all of them.

A replica that dies leaves its files: its counters stay in the totals (as a dead worker's do), and the front's
:meth:`SharedMetrics.reap` removes its live gauges (requests running, models loaded) once its process is gone.
Replicas on other machines of a cluster (``--ray-address``) cannot share a directory: each shows its own values.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

#: The files of gauges that count only while their process lives (``live*`` multiprocess modes), by pid.
LIVE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db")


class SharedMetrics:
    """The directory the replicas of one ``maas serve --engine ray`` share; removed by :meth:`close`."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="maas-ray-metrics-"))  # 0700: only this user's processes

    @property
    def env(self) -> dict[str, str]:
        """What the replicas' environment needs."""
        return {"PROMETHEUS_MULTIPROC_DIR": str(self.directory)}

    def reap(self) -> list[int]:
        """Take the live gauges of replica processes that have died out of the totals; returns their pids."""
        from prometheus_client import multiprocess

        dead = sorted({int(m.group(1)) for f in self._files() if (m := LIVE_FILE.fullmatch(f)) and not _alive(m)})
        for pid in dead:
            multiprocess.mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]
        return dead

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _files(self) -> list[str]:
        with contextlib.suppress(OSError):
            return os.listdir(self.directory)
        return []


def _alive(match: re.Match[str]) -> bool:
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
