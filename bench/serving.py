"""Serving: a real ``maas serve`` driven by external load generators, against the in-process ceiling and a naive
FastAPI server, all on this machine in the same run.

One-row requests to a 784→1024→1024→10 MLP at 1, 8 and 64 connections: JSON over HTTP (``wrk``), binary
tensors over HTTP and gRPC (Triton's ``perf_analyzer``); the naive server gets the same ``wrk`` runs. The load
generators share the CPUs with the server, so on a small machine they take part of what they measure.
``BENCH_SECONDS`` (default 10) sets the seconds per point, ``BENCH_ROUNDS`` (default 1) how many times each
point is measured (interleaved; the best round is reported, as interference only slows a run down), and
``BENCH_MAAS_WORKERS`` (default: the CPU count) how many worker processes ``maas serve`` runs, as a user would
deploy it on this machine.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import loadgen
import numpy as np
import reference
import servers
import serving_report
import tools
from loadgen import LoadError, Point
from rich.console import Console

import report

NAME = "serving"
MODEL = "mlp"
CONNECTIONS = (1, 8, 64)
DEPLOY = ("--max-batch-size", "32", "--max-queue-delay-ms", "0")
ATTEMPTS = 2  # per point: the server may misbehave transiently
WARMUP_S = 1.0  # per mode, untimed, before its first point
#: Mode -> what it is, in the order they run and are shown.
MODES = {
    "maas json-http": "maas serve, OIP JSON over HTTP, wrk",
    "maas binary-http": "maas serve, binary tensors over HTTP, perf_analyzer",
    "maas grpc": "maas serve, gRPC, perf_analyzer",
    "naive json-http": "FastAPI + onnxruntime per request (bench/naive_server.py), wrk",
}
TOOL = {
    "maas json-http": "wrk",
    "maas binary-http": "perf_analyzer",
    "maas grpc": "perf_analyzer",
    "naive json-http": "wrk",
}
Runner = Callable[[int, float], Point]


def _workers() -> int:
    return int(os.environ.get("BENCH_MAAS_WORKERS") or os.cpu_count() or 1)


def _settings() -> tuple[float, int]:
    seconds = float(os.environ.get("BENCH_SECONDS", "10"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "1"))
    if seconds <= 0 or rounds < 1:
        raise SystemExit(f"BENCH_SECONDS must be > 0 and BENCH_ROUNDS >= 1, got {seconds:g} and {rounds}")
    return seconds, rounds


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM leaves through the ``finally`` blocks, as Ctrl-C does, so the servers are stopped."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tools(say: Callable[[str], None]) -> tuple[dict[str, tools.Tool], dict[str, str]]:
    found: dict[str, tools.Tool] = {}
    missing: dict[str, str] = {}
    for name, get in (("wrk", tools.wrk), ("perf_analyzer", tools.perf_analyzer)):
        try:
            found[name] = get(say)
        except tools.ToolMissing as exc:
            missing[name] = str(exc)
    return found, missing


def _outputs(response: httpx.Response) -> np.ndarray:
    response.raise_for_status()
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _check(what: str, got: np.ndarray, want: np.ndarray) -> None:
    """Refuse to time a server that answers differently from the reference (an error path is fast too)."""
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise AssertionError(f"{what} answers differently from in-process onnxruntime:\n{got}\nwant\n{want}")


def _check_json(server: servers.Server, sess: Any, body: bytes, x_body: np.ndarray) -> None:
    """Four rows in one request, then the very body wrk posts."""
    x = reference.rows(4, seed=1)
    url = f"{server.url}/v2/models/{MODEL}/infer"
    for what, payload, inputs in (("JSON, 4 rows", loadgen.infer_body(x), x), ("wrk's body", body, x_body)):
        got = _outputs(httpx.post(url, content=payload, headers={"Content-Type": "application/json"}, timeout=30))
        _check(f"{server.name} ({what})", got, sess.run(None, {"input": inputs})[0])


def _check_tensors(server: servers.Server, sess: Any, protocol: str) -> None:
    """Binary HTTP or gRPC, through the venv's tritonclient (perf_analyzer sends random data it never checks)."""
    x = reference.rows(4, seed=2)
    if protocol == "http":
        import tritonclient.http as client

        triton: Any = client.InferenceServerClient(server.address)
        inp = client.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        outputs = [client.InferRequestedOutput("output", binary_data=True)]
    else:
        import tritonclient.grpc as grpcclient

        triton = grpcclient.InferenceServerClient(server.grpc_address)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        outputs = [grpcclient.InferRequestedOutput("output")]
    got = triton.infer(MODEL, [inp], outputs=outputs).as_numpy("output")
    _check(f"{server.name} ({protocol} tensors)", got, sess.run(None, {"input": x})[0])


def _pa_shape(server: servers.Server) -> str:
    """perf_analyzer's ``--shape``: without the batch dimension when the server says the model batches."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        config = httpx.get(f"{server.url}/v2/models/{MODEL}/config", timeout=10).json()
        if int(config.get("max_batch_size", 0)) > 0:
            return f"input:{reference.SIZES[0]}"
    return f"input:1,{reference.SIZES[0]}"


@dataclass
class Setup:
    """What one run works with: the model, its registry, the fixed request and the tools found."""

    work: Path
    home: Path
    onnx: Path
    sess: Any
    x_body: np.ndarray  # the row wrk posts
    body: bytes
    found: dict[str, tools.Tool]
    skipped: dict[str, str]  # mode -> why it was not (fully) measured
    say: Callable[[str], None]
    pa_shape: str | None = None  # perf_analyzer's --shape, once the server's model config is read


def _prepare(work: Path, say: Callable[[str], None]) -> Setup:
    found, missing = _tools(say)
    skipped = {mode: missing[tool] for mode, tool in TOOL.items() if tool in missing}
    say("exporting the MLP to ONNX")
    onnx = reference.build_mlp(work / "export" / f"{MODEL}.onnx")
    home = work / "home"
    proc = servers.maas_cli("models", "register", str(onnx), "--name", MODEL, home=home)
    if proc.returncode != 0:
        raise RuntimeError(f"maas models register failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    x_body = reference.rows(1)
    return Setup(work, home, onnx, reference.session(onnx), x_body, loadgen.infer_body(x_body), found, skipped, say)


def _features(setup: Setup) -> dict[str, Any]:
    """What the installed maas offers: gRPC (``serve --grpc-port``) and dynamic batching (``maas deploy``)."""
    grpc = "--grpc-port" in servers.cli_options("serve", home=setup.home)
    if not grpc:
        setup.skipped.setdefault("maas grpc", "`maas serve --help` has no --grpc-port: this maas serves no gRPC")
    batching = {"on": False, "how": "no `maas deploy` in this maas: every request runs on its own"}
    if servers.cli_has_command("deploy", home=setup.home):
        proc = servers.maas_cli("deploy", MODEL, *DEPLOY, home=setup.home)
        lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        said = lines[0] if proc.returncode == 0 and lines else " | ".join(lines[-3:])
        batching = {"on": proc.returncode == 0, "how": f"maas deploy {MODEL} {' '.join(DEPLOY)}: {said[:300]}"}
        setup.say(f"maas deploy {MODEL} {' '.join(DEPLOY)} -> exit {proc.returncode}")
    return {"grpc": grpc, "batching": batching}


def _runners(stack: contextlib.ExitStack, setup: Setup, grpc: bool) -> dict[str, Runner]:
    """Start both servers, check their answers, and return a runner per mode that can run."""
    lua = loadgen.write_lua(setup.work / "post.lua", setup.body)
    maas = stack.enter_context(servers.maas_server(setup.home, grpc=grpc, workers=_workers()))
    setup.say(f"maas serve ready at {maas.url}" + (f", gRPC at {maas.grpc_address}" if grpc else ""))
    _check_json(maas, setup.sess, setup.body, setup.x_body)
    naive = stack.enter_context(servers.naive_server(setup.onnx, MODEL))
    setup.say(f"naive server ready at {naive.url}")
    _check_json(naive, setup.sess, setup.body, setup.x_body)
    runners: dict[str, Runner] = {}
    if "wrk" in setup.found:
        wrk = setup.found["wrk"]
        for mode, server in (("maas json-http", maas), ("naive json-http", naive)):
            url = f"{server.url}/v2/models/{MODEL}/infer"
            runners[mode] = functools.partial(_wrk_point, wrk, url, lua, mode)
    if "perf_analyzer" in setup.found:
        shape = setup.pa_shape = _pa_shape(maas)
        for mode, protocol, address in (
            ("maas binary-http", "http", maas.address),
            ("maas grpc", "grpc", maas.grpc_address),
        ):
            if mode in setup.skipped or address is None:
                continue
            try:
                _check_tensors(maas, setup.sess, protocol)
            except AssertionError:
                raise
            except Exception as exc:  # the protocol is not served (yet): say so, time the rest
                setup.skipped[mode] = f"no answer to {protocol} tensors: {' '.join(str(exc).split())[:300]}"
                continue
            pa = setup.found["perf_analyzer"]
            runners[mode] = functools.partial(_pa_point, pa, address, protocol, shape, mode, setup.work)
    return {mode: runners[mode] for mode in MODES if mode in runners}


def _wrk_point(wrk: tools.Tool, url: str, lua: Path, mode: str, connections: int, seconds: float) -> Point:
    return loadgen.run_wrk(wrk, url, lua, mode=mode, connections=connections, seconds=seconds)


def _pa_point(
    pa: tools.Tool, address: str, protocol: str, shape: str, mode: str, work: Path, connections: int, seconds: float
) -> Point:
    return loadgen.run_perf_analyzer(
        pa,
        address,
        protocol=protocol,
        model=MODEL,
        shape=shape,
        mode=mode,
        connections=connections,
        seconds=seconds,
        workdir=work,
    )


def _attempt(run: Runner, connections: int, seconds: float) -> Point | str:
    """The point, or why it could not be had in ``ATTEMPTS`` tries."""
    reason = ""
    for _ in range(ATTEMPTS):
        try:
            return run(connections, seconds)
        except (LoadError, subprocess.TimeoutExpired) as exc:
            reason = " ".join(str(exc).split())[:400]
    return reason


def _measure(
    runners: dict[str, Runner], setup: Setup, seconds: float, rounds: int
) -> tuple[list[tuple[int, Point]], list[dict[str, reference.Loop]]]:
    """Every (round, point) and every round's in-process ceiling: a warm-up per mode, then the rounds, each
    measuring the ceiling, then every mode at every connection count."""
    live = dict(runners)
    for mode, run in runners.items():
        setup.say(f"{mode}: warm-up, {WARMUP_S:g} s at 8 connections")
        got = _attempt(run, 8, WARMUP_S)
        if isinstance(got, str):
            setup.skipped[mode] = got
            del live[mode]
    points: list[tuple[int, Point]] = []
    ceilings: list[dict[str, reference.Loop]] = []
    for r in range(rounds):
        setup.say(f"round {r + 1}/{rounds}: in-process ceiling, {seconds:g} s each")
        ceilings.append(reference.ceiling(setup.sess, setup.body, seconds))
        for mode, run in list(live.items()):
            for n in CONNECTIONS:
                setup.say(f"round {r + 1}/{rounds}: {mode}, {n} connections, {seconds:g} s")
                got = _attempt(run, n, seconds)
                if isinstance(got, str):
                    setup.skipped[mode] = f"failed at {n} connections: {got}"
                    del live[mode]
                    break
                points.append((r, got))
    return points, ceilings


def run(console: Console) -> None:
    """Measure, print the tables, write ``results/serving.{json,md,png}`` (see ``serving_report``)."""
    seconds, rounds = _settings()
    machine = report.machine_info(("onnxruntime", "torch", "numpy", "fastapi", "uvicorn", "maas"))

    def say(message: str) -> None:
        console.print(f"[dim]{message}[/]")

    with _sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp:
        setup = _prepare(Path(tmp), say)
        features = _features(setup)
        with contextlib.ExitStack() as stack:
            runners = _runners(stack, setup, features["grpc"])
            points, ceilings = _measure(runners, setup, seconds, rounds)

    config = {
        "model": f"MLP {'->'.join(map(str, reference.SIZES))} (ONNX, FP32), one row per request",
        "seconds_per_point": seconds,
        "rounds": rounds,
        "connections": list(CONNECTIONS),
        "modes": MODES,
        "grpc": features["grpc"],
        "maas_workers": _workers(),
        "batching": features["batching"],
        "perf_analyzer_shape": setup.pa_shape,
        "tools": ", ".join(f"{t.name} {t.version}" for t in setup.found.values()) or "none",
    }
    paths = serving_report.publish(
        console,
        machine=machine,
        config=config,
        ceilings=ceilings,
        points=points,
        skipped=setup.skipped,
        baseline="naive json-http",
    )
    console.print("wrote " + ", ".join(_shown(p) for p in paths))


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
