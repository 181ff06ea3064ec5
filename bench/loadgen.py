"""Run the external load generators at one connection count each and read their figures back.

``wrk`` posts one fixed JSON body (a Lua script) and reports percentiles with ``--latency``; ``perf_analyzer``
sends binary tensors over HTTP, or gRPC, and writes a CSV. Both run in their own process group, killed on a
timeout, an error or Ctrl-C. A run that got any error answer raises :class:`LoadError`: an error path is fast
too, and must not be timed as a server.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tools import Tool

from maas.testing import processes

#: How many windows perf_analyzer averages: it stops once the last 3 agree (we let them always agree, below).
PA_WINDOWS = 3
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


class LoadError(RuntimeError):
    """A load generator failed, or the server answered errors under load."""


@dataclass(frozen=True)
class Point:
    """One load generator run: ``connections`` requests in flight for ``seconds``."""

    mode: str
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int | None
    seconds: float


def infer_body(x: np.ndarray, name: str = "input") -> bytes:
    """An Open Inference Protocol JSON request carrying ``x`` (FP32) as input ``name``."""
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()


def write_lua(path: Path, body: bytes) -> Path:
    """A wrk script that POSTs ``body`` as JSON on every request."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body would end the Lua long string early")
    path.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [==[{text}]==]\n'
    )
    return path


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(text: str) -> dict[str, float | int]:
    """req/s, p50/p99 (ms), requests, seconds and error counts from ``wrk --latency`` output."""
    found: dict[str, float | int] = {}
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
        if m:
            found[key] = _ms(*m.groups())
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    if m:
        found["requests"] = int(m.group(1))
        found["seconds"] = _ms(m.group(2), m.group(3)) / 1e3
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        found["requests_per_s"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    found["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    found["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    missing = {"p50_ms", "p99_ms", "requests", "seconds", "requests_per_s"} - found.keys()
    if missing:
        raise LoadError(f"wrk's output lacks {', '.join(sorted(missing))}:\n{text[-2000:]}")
    return found


def run_wrk(wrk: Tool, url: str, script: Path, *, mode: str, connections: int, seconds: float) -> Point:
    """``wrk -t1 -cN -dDs --latency -s script url``: one client thread, so it takes one core at most."""
    cmd = [str(wrk.path), "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "30s"]
    cmd += ["-s", str(script), url]
    proc = processes.run(cmd, timeout=seconds + 60, text=True, env=wrk.environ())
    if proc.returncode != 0:
        raise LoadError(f"wrk exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    got = parse_wrk(proc.stdout)
    if got["non_2xx"] or got["socket_errors"] or not got["requests"]:
        raise LoadError(
            f"{mode} at {connections} connections: {got['requests']} requests, {got['non_2xx']} error answers, "
            f"{got['socket_errors']} socket errors; refusing to time it:\n{proc.stdout[-2000:]}"
        )
    return Point(
        mode,
        connections,
        float(got["requests_per_s"]),
        float(got["p50_ms"]),
        float(got["p99_ms"]),
        int(got["requests"]),
        float(got["seconds"]),
    )


def parse_perf_csv(text: str, concurrency: int) -> dict[str, float]:
    """Throughput (infer/s) and p50/p99 (µs in the file, ms here) of the row for ``concurrency``."""
    for row in csv.DictReader(io.StringIO(text)):
        if int(row["Concurrency"]) == concurrency:
            return {
                "requests_per_s": float(row["Inferences/Second"]),
                "p50_ms": float(row["p50 latency"]) / 1e3,
                "p99_ms": float(row["p99 latency"]) / 1e3,
            }
    raise LoadError(f"perf_analyzer's CSV has no row for concurrency {concurrency}:\n{text[:2000]}")


def run_perf_analyzer(
    pa: Tool,
    address: str,
    *,
    protocol: str,
    model: str,
    shape: str,
    mode: str,
    connections: int,
    seconds: float,
    workdir: Path,
) -> Point:
    """``perf_analyzer --concurrency-range N`` (synchronous: one thread per request in flight) for ``seconds``.

    perf_analyzer measures in windows until the last three agree within ``-s`` percent; a large ``-s`` makes it
    stop after exactly three windows of ``seconds / 3``, so every point takes the same time as wrk's.
    """
    out = workdir / f"pa-{protocol}-{connections}.csv"
    out.unlink(missing_ok=True)
    interval_ms = max(100, round(seconds * 1000 / PA_WINDOWS))
    cmd = [str(pa.path), "-m", model, "-u", address, "-i", protocol, "--service-kind", "triton"]
    cmd += ["--concurrency-range", str(connections), "--input-data", "random", "--shape", shape, "-b", "1"]
    cmd += ["--measurement-interval", str(interval_ms), "-s", "1000", "-f", str(out)]
    if protocol == "http":
        cmd += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
    proc = processes.run(cmd, timeout=seconds * 4 + 60, text=True, env=pa.environ())
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in text.strip().splitlines() if line.strip()]
        hint = ""
        if "model config" in text:
            hint = (
                "; perf_analyzer needs Triton's model configuration (GET /v2/models/NAME/config over HTTP, the "
                "ModelConfig RPC over gRPC), which this server does not answer"
            )
        raise LoadError(f"perf_analyzer exited with {proc.returncode}: {' | '.join(lines[-3:])}{hint}")
    got = parse_perf_csv(out.read_text(), connections)
    count = re.search(r"Request count:\s*(\d+)", text)
    return Point(
        mode,
        connections,
        got["requests_per_s"],
        got["p50_ms"],
        got["p99_ms"],
        int(count.group(1)) if count else None,
        PA_WINDOWS * interval_ms / 1e3,
    )
