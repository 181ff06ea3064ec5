"""What the LLM benchmark's measurements share the machine with: the servers' resident memory, and the cores other
processes keep busy (on a shared machine, the figures are read with it)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import psutil


def _busy_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


class Watch:
    """What the measurements share the machine with. In a thread, every 0.2 s, the resident memory of each server
    (its process and children); :meth:`take` returns each one's peak since the last take, and how many cores other
    processes kept busy meanwhile: the machine's busy CPU time less this process's and the servers'."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._servers: dict[str, psutil.Process] = {}
        self._peaks: dict[str, int] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watch", daemon=True)
        self._mark = self._marks()

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self._servers[name] = psutil.Process(pid)

    def _tree(self, proc: psutil.Process) -> list[psutil.Process]:
        try:
            return [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return []

    def _rss(self) -> dict[str, int]:
        out = {}
        for name, proc in list(self._servers.items()):
            rss = 0
            for p in self._tree(proc):
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
            out[name] = rss
        return out

    def _marks(self) -> tuple[float, float, float]:
        """(wall clock, the machine's busy CPU-seconds, ours)."""
        ours = 0.0
        procs = [self._me, *(p for proc in list(self._servers.values()) for p in self._tree(proc))]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                ours += t.user + t.system
        return time.monotonic(), _busy_cpu_s(), ours

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            rss = self._rss()
            with self._lock:
                for name, value in rss.items():
                    self._peaks[name] = max(self._peaks.get(name, 0), value)

    def take(self) -> dict[str, Any]:
        """``rss_mib`` (server -> peak) and ``others_cores`` since the last take."""
        mark, rss = self._marks(), self._rss()
        with self._lock:
            peaks = {name: max(self._peaks.get(name, 0), value) / 2**20 for name, value in rss.items()}
            self._peaks = {}
        (wall0, busy0, ours0), self._mark = self._mark, mark
        others = max(0.0, (mark[1] - busy0) - (mark[2] - ours0)) / max(mark[0] - wall0, 1e-9)
        return {"rss_mib": peaks, "others_cores": others}

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
