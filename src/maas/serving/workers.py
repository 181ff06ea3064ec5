"""``maas serve --workers N``: a supervisor process that runs N worker processes (:mod:`maas.serving.worker`) on
the same HTTP and gRPC ports, restarts those that die, and stops them all on SIGINT or SIGTERM.

The supervisor serves nothing itself. It checks that the ports are free, then gives the workers

- their share of the CPUs: ``MAAS_RUNTIME_THREADS`` defaults to the CPU count divided by N, and
  ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` to the same (a variable already set is kept), so N workers never
  oversubscribe the cores;
- one directory for Prometheus' multiprocess metrics, so that whichever worker answers ``/metrics`` counts the
  requests of all of them (a dead worker's counts stay; its gauges go).

Each worker follows the registry on its own (polling every ``MAAS_WATCH_INTERVAL_S``), so an alias move
reaches all of them within one interval plus a load.

A worker that exits is restarted after a backoff (0.5 s, doubling up to 30 s while it keeps dying young); it
joins the port once its models are loaded. A worker that stops answering ``/v2/health/live`` on its private
socket for :data:`HUNG_AFTER_S` is killed and restarted. When no worker is serving and one has failed to start
:data:`MAX_START_FAILURES` times in a row, the supervisor stops and exits 1.

Why CPUs / N threads: on 2 cores (a 784-1024-1024-10 MLP in ONNX, one JSON row per request, ``wrk -t1 -c8
-d5s``, median of 12-15 runs on a busy machine), requests/s with p50 / p99 latency::

    workers  MAAS_RUNTIME_THREADS   req/s (best)    p50     p99
    1        unset (ORT: 2)         1574 (1939)     4.0 ms  27 ms
    1        1                      1149 (1779)     6.2 ms  30 ms
    1        2                       816 (1250)     7.5 ms  59 ms
    2        1 (= 2 CPUs / 2)       2081 (3632)     3.6 ms  23 ms
    2        2                       728 (1458)     9.9 ms  75 ms

Two workers of 2 threads each fight over the cores (a third of the throughput, three times the p99).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from maas import envs
from maas.serving import listen
from maas.serving.settings import ServerSettings
from maas.serving.worker import WorkerSpec

log = logging.getLogger(__name__)

#: A worker that exits before it was ever ready this many times in a row, while no other worker serves,
#: stops the supervisor (exit code 1): the cause is not going away by itself.
MAX_START_FAILURES = 3
#: Restart delays: BACKOFF_S, doubled for each further early death, at most MAX_BACKOFF_S.
BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: A worker that ran this long before it died starts again with the shortest delay.
STABLE_AFTER_S = 60.0
#: How often a ready worker's liveness is checked, and how long it may go unanswered before it is killed.
LIVE_EVERY_S = 5.0
HUNG_AFTER_S = 30.0
#: How long workers have to stop after SIGTERM (uvicorn's graceful 5 s, then the app's shutdown); then SIGKILL.
STOP_GRACE_S = 15.0
_TICK_S = 0.1
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runtime_threads(workers: int) -> int:
    """Default compute threads of one model run in each of ``workers`` processes."""
    return max(1, cpu_count() // workers)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready: bool = False
    start_failures: int = 0  # exits before ready, in a row
    deaths: int = 0  # exits soon after the previous start, in a row (sets the backoff)
    restart_at: float | None = None
    live_at: float = 0.0  # last answer to /v2/health/live
    checked_at: float = 0.0


class Supervisor:
    """Runs ``workers`` worker processes serving ``settings``; :meth:`run` returns the exit code."""

    def __init__(
        self,
        settings: ServerSettings,
        workers: int,
        *,
        log_level: str = "info",
        on_ready: Callable[[ServerSettings], None] | None = None,
    ) -> None:
        if workers < 2:
            raise ValueError(f"a supervisor runs 2 or more workers, not {workers}; serve 1 in this process")
        self.settings = settings
        self.workers = [_Worker(i) for i in range(workers)]
        self.log_level = log_level
        self.on_ready = on_ready
        self._signals = 0
        self._rundir = Path()
        self._env: dict[str, str] = {}

    # --- life cycle ----------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers, keep them running until SIGINT or SIGTERM (exit code 0) or until they cannot start
        (1). Raises :class:`~maas.serving.listen.PortInUse` before starting anything when a port is taken. Call
        it from the main thread: it handles SIGINT and SIGTERM while it runs."""
        s = self.settings
        port = listen.claim_port(s.host, s.port, "HTTP", "--port")
        grpc_port = None if s.grpc_port is None else listen.claim_port(s.host, s.grpc_port, "gRPC", "--grpc-port")
        self.settings = s.model_copy(update={"port": port, "grpc_port": grpc_port})
        self._rundir = Path(tempfile.mkdtemp(prefix="maas-workers-"))  # private (0700): control sockets, metrics
        (self._rundir / "metrics").mkdir()
        self._env = self._worker_env()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for w in self.workers:
                self._spawn(w, join_when_ready=False)
            return self._supervise()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self._rundir, ignore_errors=True)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1  # the first stops gracefully, a second at once (see _stop_all)

    def _worker_env(self) -> dict[str, str]:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._rundir / "metrics")}
        threads = str(envs.MAAS_RUNTIME_THREADS or runtime_threads(len(self.workers)))
        env["MAAS_RUNTIME_THREADS"] = threads
        for name in _THREAD_VARIABLES:  # what libraries outside maas' runtimes (OpenMP, MKL) read
            env.setdefault(name, threads)
        return env

    # --- the loop ------------------------------------------------------------------------------

    def _supervise(self) -> int:
        announced = False
        while not self._signals:
            now = time.monotonic()
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    self._reap(w, now)
                    if w.start_failures >= MAX_START_FAILURES and not any(o.ready for o in self.workers):
                        log.error(
                            "worker %d failed to start %d times in a row and no worker is serving; stopping "
                            "(its output above says why)",
                            w.index,
                            w.start_failures,
                        )
                        return 1
                elif w.proc is None and w.restart_at is not None and now >= w.restart_at:
                    self._spawn(w, join_when_ready=any(o.ready for o in self.workers))
                elif w.proc is not None:
                    self._check(w, now)
            if not announced and all(w.ready for w in self.workers):
                announced = True
                if self.on_ready is not None:
                    self.on_ready(self.settings)
            time.sleep(_TICK_S)
        return 0

    def _spawn(self, w: _Worker, *, join_when_ready: bool) -> None:
        control = self._rundir / f"worker-{w.index}.sock"
        control.unlink(missing_ok=True)  # a dead worker's
        spec = WorkerSpec(
            settings=self.settings,
            index=w.index,
            supervisor_pid=os.getpid(),
            control_path=str(control),
            join_when_ready=join_when_ready,
            log_level=self.log_level,
        )
        # The same process group as the supervisor: a group kill (a terminal's, a test's) reaches the workers too.
        proc = subprocess.Popen([sys.executable, "-m", "maas.serving.worker"], stdin=subprocess.PIPE, env=self._env)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            proc.stdin.write(spec.model_dump_json().encode())
        w.proc, w.started_at, w.ready, w.restart_at = proc, time.monotonic(), False, None
        log.debug("worker %d started (pid %d)", w.index, proc.pid)

    def _check(self, w: _Worker, now: float) -> None:
        """Readiness until the worker is ready, then liveness every LIVE_EVERY_S."""
        assert w.proc is not None
        control = str(self._rundir / f"worker-{w.index}.sock")
        if not w.ready:
            if listen.probe(control, "/v2/health/ready", timeout_s=1.0) == 200:
                w.ready, w.start_failures, w.live_at, w.checked_at = True, 0, now, now
                log.info("worker %d (pid %d) ready", w.index, w.proc.pid)
            return
        if now - w.checked_at < LIVE_EVERY_S:
            return
        w.checked_at = now
        if listen.probe(control, "/v2/health/live", timeout_s=2.0) == 200:
            w.live_at = now
        elif now - w.live_at > HUNG_AFTER_S:
            log.error(
                "worker %d (pid %d) has not answered /v2/health/live for %.0f s; killing it",
                w.index,
                w.proc.pid,
                now - w.live_at,
            )
            w.proc.kill()

    def _reap(self, w: _Worker, now: float) -> None:
        assert w.proc is not None
        pid, code = w.proc.pid, w.proc.returncode
        _forget(pid, self._rundir / "metrics")
        ran = now - w.started_at
        w.deaths = 1 if ran >= STABLE_AFTER_S else w.deaths + 1
        if not w.ready:
            w.start_failures += 1
        delay = min(BACKOFF_S * 2 ** (w.deaths - 1), MAX_BACKOFF_S)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        when = f"after {ran:.1f} s" if w.ready else "before it was ready"
        log.warning("worker %d (pid %d) %s %s; restarting it in %.1f s", w.index, pid, how, when, delay)
        w.proc, w.ready, w.restart_at = None, False, now + delay

    def _stop_all(self) -> None:
        """SIGTERM to every worker; SIGKILL to those still running after STOP_GRACE_S or a second signal."""
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        signals_seen = self._signals  # one more than these stops them at once
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        while any(p.poll() is None for p in running):
            if time.monotonic() > deadline or self._signals > signals_seen:
                log.warning("workers did not stop in time; killing them")
                for proc in running:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                for proc in running:
                    proc.wait()
                break
            time.sleep(_TICK_S)
        for w in self.workers:
            if w.proc is not None:
                _forget(w.proc.pid, self._rundir / "metrics")
                w.proc = None


def _forget(pid: int, metrics_dir: Path) -> None:
    """A dead worker's live gauges leave the metrics (its counters stay in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
