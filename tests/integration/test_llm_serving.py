"""Continuous batching through the real server and the unmodified ``openai`` client, on SmolLM2-135M-Instruct: greedy
answers are exactly the engine's one-at-a-time greedy answers, alone and among concurrent streams; abandoned
streams give back their slots and memory; the usage chunk comes only when asked, last before ``[DONE]``."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import torch

from maas.registry import Registry
from maas.testing.server import RemoteServer

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colours.",
    "Explain what a CPU does in one sentence.",
    "Say hello in Spanish.",
    "What is 12 times 12?",
    "Name a famous painter.",
    "Give me a tip for learning to cook.",
]
TOKENS = 24


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm_gguf: Path, seed_smollm: Callable[[Path], None]
) -> Iterator[RemoteServer]:
    home = tmp_path_factory.mktemp("llm-serving-home")
    seed_smollm(home)
    Registry(home=home).register(smollm_gguf, "smollm")
    with RemoteServer(home, env={"MAAS_LOAD_WAIT_S": "180", "MAAS_LLM_THREADS": "1"}, ready_timeout_s=300) as srv:
        yield srv
        assert srv.alive(), srv.log()


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(smollm_dir: Path) -> dict[str, str]:
    """Each prompt's greedy answer from the decoder alone (the engine's reference loop), one thread like the server."""
    from maas.runtimes.causal_lm.model import DecoderLM
    from maas.runtimes.causal_lm.tokenizer import ChatTokenizer

    tokenizer, model = ChatTokenizer(smollm_dir), DecoderLM.from_pretrained_dir(smollm_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        answers = {}
        for prompt in PROMPTS:
            ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]), special=True)
            answers[prompt] = tokenizer.decode(model.greedy(ids, TOKENS, tokenizer.eos_token_ids))
        return answers
    finally:
        torch.set_num_threads(threads)


def ask(client: openai.OpenAI, prompt: str, *, stream: bool = False) -> str:
    messages: Any = [{"role": "user", "content": prompt}]
    if not stream:
        answer = client.chat.completions.create(model="smollm", messages=messages, temperature=0, max_tokens=TOKENS)
        return answer.choices[0].message.content or ""
    chunks = client.chat.completions.create(
        model="smollm", messages=messages, temperature=0, max_tokens=TOKENS, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_greedy_answers_equal_the_engines_alone_and_among_seven_other_streams(
    client: openai.OpenAI, reference: dict[str, str]
) -> None:
    assert ask(client, PROMPTS[0]) == reference[PROMPTS[0]]
    assert ask(client, PROMPTS[1], stream=True) == reference[PROMPTS[1]]
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(prompt: str, stream: bool) -> None:
        try:
            results[prompt] = ask(client, prompt, stream=stream)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p, i % 2 == 0)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert results == reference


def metric(server: RemoteServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf'^{name}\{{[^}}]*model="smollm"[^}}]*\}} (\S+)$', text, re.M))


def test_abandoned_streams_free_their_slots_and_memory(server: RemoteServer, client: openai.OpenAI) -> None:
    assert server.proc is not None
    proc = psutil.Process(server.proc.pid)

    def abandon(count: int) -> None:
        def one(i: int) -> None:
            stream = client.chat.completions.create(
                model="smollm",
                messages=[{"role": "user", "content": f"Tell me a long story about dragon number {i}."}],
                max_tokens=2000,
                temperature=1.0,
                stream=True,
            )
            for j, _ in enumerate(stream):
                if j == 2:
                    break
            stream.close()

        for start in range(0, count, 10):  # ten at a time
            batch = [threading.Thread(target=one, args=(i,)) for i in range(start, min(count, start + 10))]
            for t in batch:
                t.start()
            for t in batch:
                t.join(300)

    def settled() -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if metric(server, "maas_llm_running") == 0 and metric(server, "maas_llm_queued") == 0:
                return True
            time.sleep(0.2)
        return False

    abandon(10)  # warm-up: the allocator's pools, the engine's first caches
    assert settled()
    before = proc.memory_info().rss
    abandon(50)
    assert settled(), "running or queued sequences left after every client went away"
    grown = proc.memory_info().rss - before
    assert grown < 50 * 1024 * 1024, f"the server grew by {grown / 2**20:.1f} MiB"


def sse_events(server: RemoteServer, body: dict[str, Any]) -> list[Any]:
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("include_usage", [True, False, None])
def test_the_usage_chunk_comes_only_when_asked_and_last(server: RemoteServer, include_usage: bool | None) -> None:
    body: dict[str, Any] = {
        "model": "smollm",
        "messages": [{"role": "user", "content": PROMPTS[2]}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "n": 2,
    }
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    events = sse_events(server, body)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert usage_chunks == [chunks[-1]] and chunks[-1]["choices"] == []
        usage = chunks[-1]["usage"]
        assert 2 <= usage["completion_tokens"] <= 2 * 12  # two choices of at most 12 tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    else:
        assert usage_chunks == [] and all(c["choices"] for c in chunks)
    finishes = {ch["index"]: ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")}
    assert set(finishes) == {0, 1}
