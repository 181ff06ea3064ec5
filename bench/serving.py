"""Serving overhead: the digits MLP run in-process by onnxruntime, then through ``maas serve`` with tritonclient.

Both sides run on this machine in the same run, so the ratios are what the server adds here (with the client
and the server sharing the CPUs). A server call is timed as a user pays for it: building the request,
the HTTP round trip, and decoding both outputs to numpy.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

import report

NAME = "serving"
MODEL = "digits"
SECONDS = 2.0  # per measurement
WARMUP_S = 0.3
BATCHES = (1, 64)
CLIENT_THREADS = 4
OUTPUTS = ("probabilities", "label")

Call = Callable[[], object]


@dataclass(frozen=True)
class Measurement:
    path: str  # "in-process", "binary" or "json"
    batch: int
    clients: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.requests * self.batch / self.seconds


def _timed_loop(
    call: Call, seconds: float, warmup_s: float, start: threading.Barrier | None = None
) -> tuple[list[int], float]:
    """Latencies (ns) of ``call`` repeated for ``seconds`` after ``warmup_s`` of untimed calls, and the wall time."""
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        call()
    if start is not None:
        start.wait()
    latencies = []
    began = time.perf_counter()
    end = began + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        call()
        latencies.append(time.perf_counter_ns() - t0)
    return latencies, time.perf_counter() - began


def measure(path: str, batch: int, make_call: Callable[[], Call], *, clients: int = 1) -> Measurement:
    """Run ``clients`` threads, each with its own ``make_call()`` (built in that thread), for ``SECONDS``."""
    if clients == 1:
        latencies, wall = _timed_loop(make_call(), SECONDS, WARMUP_S)
    else:
        start = threading.Barrier(clients + 1)
        per_thread: list[list[int]] = [[] for _ in range(clients)]

        def worker(i: int) -> None:
            per_thread[i], _ = _timed_loop(make_call(), SECONDS, WARMUP_S, start)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        start.wait()
        began = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
        latencies = [lat for lats in per_thread for lat in lats]
    ms = np.asarray(latencies, dtype=np.float64) / 1e6
    return Measurement(
        path=path,
        batch=batch,
        clients=clients,
        requests=len(latencies),
        seconds=wall,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
    )


def build_artifact(out_dir: Path) -> tuple[Path, np.ndarray]:
    """Train the digits MLP briefly, export it to ONNX; returns the file and the held-out pixels."""
    import torch

    from maas.demo.digits import load_digits_split, train
    from maas.runtimes.export import export

    data = load_digits_split()
    model = train(data, epochs=5)
    written = export(
        model,
        (torch.from_numpy(data.x_test[:1]),),
        out_dir,
        name=MODEL,
        formats=("onnx",),
        input_names=["pixels"],
        output_names=list(OUTPUTS),
    )
    return written["onnx"], data.x_test


def in_process_session(path: Path):  # type: ignore[no-untyped-def]
    """An onnxruntime session set up as the server sets up its own (``maas.runtimes.onnx``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def in_process_call(session, pixels: np.ndarray) -> Call:  # type: ignore[no-untyped-def]
    return lambda: session.run(None, {"pixels": pixels})


def server_call(address: str, pixels: np.ndarray, *, binary: bool) -> Callable[[], dict[str, np.ndarray]]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(address)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]

    def call() -> dict[str, np.ndarray]:
        inp = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer(MODEL, [inp], outputs=outputs)
        return {name: result.as_numpy(name) for name in OUTPUTS}

    return call


def _check_same_answers(session, address: str, pixels: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """Refuse to time a server that answers differently from the reference (an error path is fast too)."""
    want = dict(zip(OUTPUTS, session.run(None, {"pixels": pixels}), strict=True))
    for binary in (True, False):
        got = server_call(address, pixels, binary=binary)()
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["label"], want["label"])


def run_all(console: Console) -> list[Measurement]:
    from maas.registry import Registry
    from maas.testing.server import RemoteServer

    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp:
        tmp_path = Path(tmp)
        with console.status("training and exporting the digits MLP"):
            onnx_path, x_test = build_artifact(tmp_path / "export")
        home = tmp_path / "home"
        Registry(home=home).register(onnx_path, MODEL)
        session = in_process_session(onnx_path)
        inputs = {batch: np.ascontiguousarray(x_test[:batch]) for batch in BATCHES}

        results = []
        for batch in BATCHES:
            with console.status(f"in-process, batch {batch}"):
                results.append(measure("in-process", batch, partial(in_process_call, session, inputs[batch])))
        with contextlib.ExitStack() as stack:
            with console.status("starting maas serve"):
                server = stack.enter_context(RemoteServer(home, env={"MAAS_DEVICE": "cpu"}))
            _check_same_answers(session, server.address, inputs[max(BATCHES)])
            for path, binary in (("binary", True), ("json", False)):
                for batch in BATCHES:
                    with console.status(f"server {path}, batch {batch}"):
                        make_call = partial(server_call, server.address, inputs[batch], binary=binary)
                        results.append(measure(path, batch, make_call))
            batch = max(BATCHES)
            with console.status(f"server binary, batch {batch}, {CLIENT_THREADS} client threads"):
                make_call = partial(server_call, server.address, inputs[batch], binary=True)
                results.append(measure("binary", batch, make_call, clients=CLIENT_THREADS))
    return results


def _ratios(results: list[Measurement]) -> list[tuple[Measurement, float | None, float | None]]:
    """Each measurement with its p50 latency and rows/s as multiples of the in-process run at its batch."""
    ref = {m.batch: m for m in results if m.path == "in-process"}
    out = []
    for m in results:
        r = ref[m.batch]
        if m is r:
            out.append((m, None, None))
        else:
            out.append((m, m.p50_ms / r.p50_ms, m.rows_per_s / r.rows_per_s))
    return out


HEADERS = ("path", "batch", "clients", "p50 ms", "p99 ms", "req/s", "rows/s", "p50 ratio", "rows/s ratio")
RATIOS = "ratios: server / in-process at the same batch"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,.0f}"


def _cells(m: Measurement, lat_ratio: float | None, rows_ratio: float | None) -> list[str]:
    return [
        m.path,
        str(m.batch),
        str(m.clients),
        f"{m.p50_ms:.3f}",
        f"{m.p99_ms:.3f}",
        _count(m.requests_per_s),
        _count(m.rows_per_s),
        "—" if lat_ratio is None else f"{lat_ratio:.1f}x",
        "—" if rows_ratio is None else f"{rows_ratio:.3f}x",
    ]


def run(console: Console) -> None:
    """Measure, print a table, write ``results/serving.json`` and this machine's section of ``serving.md``."""
    machine = report.machine_info(("onnxruntime", "tritonclient", "torch", "numpy"))
    results = _ratios(run_all(console))

    # Compact enough for an 80-column terminal (and `make bench` piped to a log).
    table = Table(
        title=f"Serving: {MODEL} MLP (64→128→10), {SECONDS:g} s per row",
        caption=RATIOS,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for i, header in enumerate(HEADERS):
        table.add_column(header.replace(" ", "\n"), justify="left" if i == 0 else "right", no_wrap=True)
    for m, lat_ratio, rows_ratio in results:
        table.add_row(*_cells(m, lat_ratio, rows_ratio))
    console.print(table)

    config = {
        "model": f"{MODEL} MLP 64->128->10 (ONNX)",
        "seconds_per_measurement": SECONDS,
        "warmup_s": WARMUP_S,
        "client": f"tritonclient.http {version('tritonclient')}",
        "timed": "server calls include building the request and decoding both outputs",
    }
    rows: list[dict[str, Any]] = [
        {
            **asdict(m),
            "requests_per_s": m.requests_per_s,
            "rows_per_s": m.rows_per_s,
            "p50_vs_in_process": lat_ratio,
            "rows_per_s_vs_in_process": rows_ratio,
        }
        for m, lat_ratio, rows_ratio in results
    ]
    json_path = report.write_json(NAME, {"benchmark": NAME, "machine": machine, "config": config, "results": rows})
    body = (
        f"Run {machine['timestamp']} on {machine['platform']}; Python {machine['python']}, "
        f"onnxruntime {machine['onnxruntime']}, {config['client']}. {config['model']}, "
        f"{SECONDS:g} s per row after {WARMUP_S:g} s of warm-up; {config['timed']}; {RATIOS}.\n\n"
        + report.markdown_table(HEADERS, [_cells(*r) for r in results])
    )
    md_path = report.write_markdown_section(NAME, "Serving benchmark", report.machine_key(machine), body)
    console.print(f"wrote {_shown(json_path)} and {_shown(md_path)}")


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
