"""``maas chat`` against a real ``maas serve`` with SmolLM2-135M-Instruct registered through the CLI: what it streams
is what the OpenAI API answers to the same request, turns keep the conversation, errors say what to do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from maas.testing import processes
from maas.testing.server import RemoteServer, free_port

CAPITAL = "What is the capital of France?"
FOLLOW_UP = "And what is the capital of Germany?"
GREEDY = ("--temperature", "0", "--max-tokens", "16")


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "MAAS_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"}


def _maas(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maas", *args], env=env, input=stdin, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, smollm_gguf: Path, seed_smollm: Callable[[Path], None]
) -> Iterator[tuple[RemoteServer, Path]]:
    home = tmp_path_factory.mktemp("chat-home")
    seed_smollm(home)  # the session's converted model: no second 30 s conversion
    registered = _maas("models", "register", str(smollm_gguf), "--name", "smollm", env=_env(home))
    assert registered.returncode == 0, registered.stdout + registered.stderr
    with RemoteServer(home, args=["--no-grpc"], env={"MAAS_LOAD_WAIT_S": "180"}, ready_timeout_s=300) as server:
        yield server, home
        assert server.alive(), server.log()


def _answer(server: RemoteServer, messages: list[dict[str, str]]) -> str:
    """The API's whole (non-streamed) greedy answer, as the reference."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    response = client.chat.completions.create(
        model="smollm",
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=16,
    )
    return response.choices[0].message.content or ""


def _chat(served: tuple[RemoteServer, Path], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    server, home = served
    return _maas("chat", *args, "--url", server.url, env=_env(home), stdin=stdin)


@pytest.mark.slow
def test_one_message_streams_what_the_api_answers(served: tuple[RemoteServer, Path]) -> None:
    want = _answer(served[0], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CAPITAL}])
    got = _chat(served, "smollm", "--system", "Be brief.", "--message", CAPITAL, *GREEDY)
    assert got.returncode == 0, got.stderr
    assert "Paris" in want
    assert got.stdout == want + "\n"


@pytest.mark.slow
def test_a_conversation_keeps_its_history(served: tuple[RemoteServer, Path]) -> None:
    first = _answer(served[0], [{"role": "user", "content": CAPITAL}])
    second = _answer(
        served[0],
        [
            {"role": "user", "content": CAPITAL},
            {"role": "assistant", "content": first},
            {"role": "user", "content": FOLLOW_UP},
        ],
    )
    got = _chat(served, "smollm", *GREEDY, stdin=f"{CAPITAL}\n\n{FOLLOW_UP}\n/exit\nnot sent\n")
    assert got.returncode == 0, got.stderr
    assert got.stdout == f"{first}\n{second}\n"


@pytest.mark.slow
def test_a_refused_turn_is_reported_and_the_conversation_goes_on(served: tuple[RemoteServer, Path]) -> None:
    too_long = "hello " * 10_000  # more tokens than the model's context of 8,192
    got = _chat(served, "smollm", *GREEDY, stdin=f"{too_long}\n{CAPITAL}\n")  # end of input quits
    assert got.returncode == 0, got.stderr
    assert "context" in got.stderr and "shorten the prompt" in got.stderr
    assert got.stdout == _answer(served[0], [{"role": "user", "content": CAPITAL}]) + "\n"


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_chat(served: tuple[RemoteServer, Path]) -> None:
    server, home = served
    proc = processes.popen(
        [
            sys.executable,
            "-m",
            "maas",
            "chat",
            "smollm",
            "--url",
            server.url,
            "--temperature",
            "0",
            "--max-tokens",
            "64",
        ],
        env=_env(home),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"Write a very long story about a dragon.\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer has started streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(f"{CAPITAL}\n/exit\n".encode(), timeout=120)
    finally:
        processes.kill_group(proc)
    assert proc.returncode == 0, err.decode()
    assert "[stopped]" in err.decode()
    assert "Paris" in out.decode()  # the next question was answered


@pytest.mark.slow
def test_an_unknown_model_fails_with_the_servers_message(served: tuple[RemoteServer, Path]) -> None:
    for stdin, args in ((None, ("--message", "hi")), ("hi\n", ())):
        got = _chat(served, "no-such-model", *args, stdin=stdin)
        assert got.returncode == 1
        assert "404" in got.stderr and "no-such-model" in got.stderr
        assert got.stdout == ""


def test_no_server_says_where_it_looked_and_what_to_start(cli_env: dict[str, str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    got = subprocess.run(
        [sys.executable, "-m", "maas", "chat", "smollm", "--url", url, "--message", "hi"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 1
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "maas serve" in lines[0], got.stderr
