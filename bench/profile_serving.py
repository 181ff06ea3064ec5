"""Where a real ``maas serve`` spends its time on the JSON inference path: py-spy samples it under wrk load.

One-row JSON requests to the benchmark MLP at 1 and 64 connections (``wrk -t1``), with batching on when this
maas has ``maas deploy``. py-spy samples every Python thread of the server (idle ones excluded) while wrk runs;
each sample counts for the component of its own frame (``COMPONENTS``; a library frame outside the table, such
as numpy or json, counts for its nearest caller in it). ``--src`` profiles another checkout's ``src/`` with
this venv, so two versions can be compared in one session. Prints a markdown section and writes it to ``--out``.

    .venv/bin/python bench/profile_serving.py [--src PATH] [--seconds S] [--repeats N] [--label T] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import loadgen
import reference
import servers
import tools

from maas.testing import processes
from maas.testing.server import free_port

MODEL = "mlp"
CONNECTIONS = (1, 64)
DEPLOY = ("--max-batch-size", "32")
RATE = 250  # py-spy samples per second
TOP = 15
PY_SPY = Path(sys.executable).with_name("py-spy")
HTTP = "HTTP (uvicorn, httptools/h11, socket writes)"
ENCODE, DECODE = "encode (encode_response, jsoncodec dumps)", "request decode (protocol, tensor_data, json)"
#: Component -> path fragments of the frames it owns; the first match wins. CODEC splits into ENCODE and DECODE.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "onnxruntime (model run)": ("/onnxruntime/", "/maas/runtimes/"),
    HTTP: ("/uvicorn/", "/httptools/", "/h11/"),
    "framework (starlette, fastapi, pydantic, anyio)": ("/starlette/", "/fastapi/", "/pydantic/", "/anyio/"),
    "maas guard, connections": ("/maas/serving/guard.py", "/maas/serving/connections.py", "/maas/serving/limits.py"),
    "CODEC": ("/maas/serving/api/v2/protocol.py", "/tensor_data.py", "/jsoncodec.py"),
    "engine, scheduler, manager, handler": (
        "/maas/serving/engine/",
        "/maas/serving/manager",
        "/maas/serving/api/v2/",
        "/maas/serving/context.py",
        "/maas/serving/app.py",
    ),
    "event loop (asyncio, uvloop)": ("/asyncio/", "/uvloop/"),
    "thread hand-offs (threading, concurrent.futures)": ("/threading.py", "/concurrent/futures/", "/queue.py"),
    "metrics (prometheus_client)": ("/prometheus_client/", "/maas/serving/metrics.py"),
}
#: Own frames whose time is a call with no Python frame of its own: connections.py's flush is transport.write,
#: the send system call (on loopback it also runs the receiving TCP stack).
OWN_FUNCS = {"_CoalescingTransport.flush": HTTP}
ENCODE_FUNCS = {"encode_response", "_dumps", "dumps_flat", "dumps_texts", "_pieces", "bytes_to_wire"}
_FRAME = re.compile(r"(.*) \((.*)\)$")
_HTTP_IMPL = re.compile(r"/uvicorn/protocols/http/(\w+)_impl\.py")


@dataclass
class Profile:
    """py-spy's samples, pooled over runs: per component, per own function, per thread name."""

    samples: int = 0
    seconds: float = 0.0
    components: Counter[str] = field(default_factory=Counter)
    functions: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)
    http: set[str] = field(default_factory=set)


def _short(path: str) -> str:
    for mark in ("site-packages/", "/src/"):
        if mark in path:
            return path.split(mark, 1)[1]
    stdlib = re.search(r"/lib/python3\.\d+/(.*)", path)
    return stdlib.group(1) if stdlib else path


def classify(frames: list[tuple[str, str]]) -> str:
    """The component of a sample: that of the innermost frame that belongs to one, so a library outside the table
    (numpy, json, uuid, sqlalchemy) counts for the caller that is in it. ``frames``: (function, file), outermost
    first."""
    for i in range(len(frames) - 1, -1, -1):
        func, path = frames[i]
        if func in OWN_FUNCS:
            return OWN_FUNCS[func]
        for component, marks in COMPONENTS.items():
            if any(mark in path for mark in marks):
                if component != "CODEC":
                    return component
                return ENCODE if any(f in ENCODE_FUNCS for f, _ in frames[: i + 1]) else DECODE
    return "other"


def read_raw(text: str, profile: Profile) -> None:
    """Add py-spy's ``--format raw --threads`` lines (``thread (TID): NAME;frame;...;frame COUNT``)."""
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        head, *rest = stack.split(";")
        frames = [(m.group(1), m.group(2)) for m in map(_FRAME.match, rest) if m]
        if not frames:
            continue
        n = int(count)
        name = head.split(": ", 1)[1] if ": " in head else head
        name = name if name.isprintable() else "(name unreadable)"  # --nonblocking can read a name mid-write
        profile.samples += n
        profile.threads[re.sub(r"([-_]\d+)+$", "", name)] += n
        profile.components[classify(frames)] += n
        func, path = frames[-1]
        profile.functions[f"`{func}` ({_short(path)})"] += n
        profile.http.update(m.group(1) for _, p in frames if (m := _HTTP_IMPL.search(p)))


def sample(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid``'s threads for ``seconds`` into ``out``, started in the background."""
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw"]
    cmd += ["--duration", f"{seconds:g}", "--nonblocking", "--threads", "--nolineno", "--full-filenames"]
    return processes.popen([*cmd, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _cli(*args: str, home: Path) -> None:
    proc = servers.maas_cli(*args, home=home)
    if proc.returncode != 0:
        raise RuntimeError(f"maas {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def _source(src: Path | None) -> str:
    where = src or Path(__file__).resolve().parents[1] / "src"
    git = ["git", "-C", str(where)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not commit:
        return f"`{where}` (not a git checkout)"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout
    return f"`{where}` at {commit}" + (" with uncommitted changes" if dirty.strip() else "")


def _table(rows: list[tuple[str, int]], total: int, head: str, us_per_sample: float) -> list[str]:
    """Share of samples, and what that is in sampled thread time per request (µs)."""
    lines = [f"| {head} | share of samples | µs per request |", "|---|---:|---:|"]
    return lines + [f"| {name} | {100 * n / total:.1f} % | {n * us_per_sample:,.0f} |" for name, n in rows]


def section(label: str, notes: list[str], points: dict[int, list[loadgen.Point]], profiles: dict[int, Profile]) -> str:
    out = [f"## {label}", "", *notes, ""]
    for c in CONNECTIONS:
        ps, prof = points[c], profiles[c]
        total = max(prof.samples, 1)

        def med(key: str, ps: list[loadgen.Point] = ps) -> str:
            values = [getattr(p, key) for p in ps]
            return f"{statistics.median(values):,.2f} ({min(values):,.2f} to {max(values):,.2f})"

        main = prof.threads.get("MainThread", 0)
        threads = ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in prof.threads.most_common())
        out += [f"### {label}: {c} connection{'s' if c > 1 else ''}", ""]
        out += [
            "| req/s | p50 ms | p99 ms | samples | busy Python threads | main thread |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        busy = prof.samples / (RATE * prof.seconds) if prof.seconds else 0.0
        out += [
            f"| {med('requests_per_s')} | {med('p50_ms')} | {med('p99_ms')} | {prof.samples:,} | {busy:.2f} "
            f"| {100 * main / total:.1f} % |",
            "",
        ]
        out += [f"Threads: {threads}. HTTP protocol in the stacks: {', '.join(sorted(prof.http)) or 'none seen'}.", ""]
        comps = sorted(prof.components.items(), key=lambda kv: -kv[1])
        us = 1e6 / RATE / max(sum(p.requests or 0 for p in ps), 1)  # one sample, per request served meanwhile
        out += [*_table(comps, total, "component", us), ""]
        out += [f"Top {TOP} functions by own samples:", ""]
        out += [*_table(prof.functions.most_common(TOP), total, "function (file)", us), ""]
    return "\n".join(out)


def measure(
    server: servers.Server, wrk: tools.Tool, lua: Path, work: Path, seconds: float, repeats: int
) -> tuple[dict[int, list[loadgen.Point]], dict[int, Profile], list[float]]:
    """A 2 s warm-up, then ``repeats`` rounds of every connection count, each sampled by py-spy: wrk's figures,
    the pooled samples and the 1-minute load average before and after each run."""
    url = f"{server.url}/v2/models/{MODEL}/infer"
    loadgen.run_wrk(wrk, url, lua, mode="warm-up", connections=64, seconds=2)
    points: dict[int, list[loadgen.Point]] = {c: [] for c in CONNECTIONS}
    profiles = {c: Profile() for c in CONNECTIONS}
    loads = [os.getloadavg()[0]]
    for r in range(repeats):
        for c in CONNECTIONS:
            raw = work / f"py-spy-{c}-{r}.txt"
            spy = sample(server.proc.pid, seconds, raw)
            point = loadgen.run_wrk(wrk, url, lua, mode="json", connections=c, seconds=seconds)
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0 or not raw.exists():
                raise RuntimeError(f"py-spy exited with {spy.returncode}: {err.decode(errors='replace')}")
            read_raw(raw.read_text(errors="replace"), profiles[c])
            profiles[c].seconds += seconds
            points[c].append(point)
            loads.append(os.getloadavg()[0])
            print(
                f"run {r + 1}/{repeats}, {c} connections: {point.requests_per_s:,.0f} req/s, p50 {point.p50_ms:.2f} "
                f"ms, p99 {point.p99_ms:.2f} ms, load {loads[-1]:.2f}",
                file=sys.stderr,
            )
    return points, profiles, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, help="a checkout's src/ to serve from (PYTHONPATH); default: installed")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per wrk run (and py-spy recording)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per connection count, interleaved")
    parser.add_argument("--label", default=None, help="the section's title")
    parser.add_argument("--out", type=Path, help="write the markdown section here too")
    args = parser.parse_args()
    if args.src is not None:  # every maas subprocess (register, deploy, serve) imports this src/
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(args.src.resolve()), os.environ.get("PYTHONPATH")])
        )
    wrk = tools.wrk()
    with tempfile.TemporaryDirectory(prefix="maas-profile-") as tmp:
        work, home = Path(tmp), Path(tmp) / "home"
        onnx = reference.build_mlp(work / f"{MODEL}.onnx")
        _cli("models", "register", str(onnx), "--name", MODEL, home=home)
        batching = "off (no `maas deploy` in this maas: every request runs alone)"
        if servers.cli_has_command("deploy", home=home):
            batching = f"on: `maas deploy {MODEL} {' '.join(DEPLOY)}`"
            _cli("deploy", MODEL, *DEPLOY, home=home)
        port = free_port()
        cmd = [sys.executable, "-m", "maas", "serve", "--port", str(port)]
        if "--no-grpc" in servers.cli_options("serve", home=home):
            cmd.append("--no-grpc")
        lua = loadgen.write_lua(work / "post.lua", loadgen.infer_body(reference.rows(1)))
        env = {**os.environ, "MAAS_HOME": str(home), "MAAS_DEVICE": "cpu"}
        # _serving starts, waits for readiness and stops a server (bench/servers.py; maas_server has no --no-grpc).
        with servers._serving("maas serve", cmd, port, env) as server:
            print(f"{' '.join(cmd[2:])} ready (pid {server.proc.pid})", file=sys.stderr)
            points, profiles, loads = measure(server, wrk, lua, work, args.seconds, args.repeats)
    notes = [
        f"- Code: {_source(args.src)}; `{' '.join(cmd[2:4])} --port P{' --no-grpc' if '--no-grpc' in cmd else ''}`;"
        f" batching {batching}.",
        f"- {args.repeats} runs of {args.seconds:g} s per connection count, interleaved, after a 2 s warm-up; wrk"
        " figures are medians (min to max in brackets). py-spy (`--rate 250 --nonblocking`, idle threads excluded)"
        " samples pooled over the runs; busy Python threads = samples / (rate * seconds); µs per request ="
        " samples / rate / requests served. A thread counts whenever it is not idle, waiting for the GIL or a CPU"
        " included.",
        f"- Load average (1 min) before and after each run: {min(loads):.2f} to {max(loads):.2f}"
        f" on {os.cpu_count()} CPUs.",
    ]
    text = section(args.label or f"maas serve from {args.src or 'the installed maas'}", notes, points, profiles)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
