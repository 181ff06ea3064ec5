"""The causal_lm format as a user meets it: `maas models register` of the real SmolLM2 GGUF in a real process, the
conversion cache it loads from, and the tokenizer checked against transformers'."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from maas import runtimes
from maas.registry import Registry
from maas.runtimes.causal_lm import SIGNATURE, ChatTokenizer, gguf_cache
from tests.llm_fixtures import write_tiny_gguf

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Bonjour ! Ça va ? 東京はどこ? 🙂"},
        {"role": "assistant", "content": "Très bien.\n\nTokyo is in Japan."},
        {"role": "user", "content": "  spaces\tand\ttabs  "},
    ],
]


def maas(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def llm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A MAAS_HOME for this module, set for the in-process loads too, and the environment for the CLI."""
    home = tmp_path_factory.mktemp("llm-home")
    env = {**os.environ, "MAAS_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("MAAS_DATABASE_URL", None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAAS_HOME", str(home))
        mp.delenv("MAAS_DATABASE_URL", raising=False)
        yield home, env


@pytest.mark.slow
def test_register_the_gguf_and_load_it_from_the_cache(llm_home: tuple[Path, dict[str, str]], smollm_gguf: Path) -> None:
    home, env = llm_home
    out = maas(env, "models", "register", str(smollm_gguf), "--name", "smollm")
    assert "models:/smollm/1 (causal_lm" in out
    shown = maas(env, "models", "show", "smollm")
    assert "causal_lm" in shown and "text_input" in shown and "text_output" in shown

    registry = Registry(home=home)
    version = registry.resolve("smollm")
    assert version.format == "causal_lm" and version.signature == SIGNATURE
    assert version.artifact_size == smollm_gguf.stat().st_size  # stored as it is, not converted
    path = registry.artifact_path(version)
    cache = home / "cache" / "causal_lm"
    assert not cache.exists()  # registering converts nothing

    started = time.monotonic()
    first = runtimes.load(path, version.format)
    first_s = time.monotonic() - started
    digest = version.artifact_digest.removeprefix("sha256:")
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [digest]
    assert not [p for p in cache.iterdir() if p.name.startswith((".convert-", ".discard-"))]
    assert first.directory == cache / digest and gguf_cache.damage(first.directory) is None
    config = (first.directory / "config.json").read_text()
    assert "quantization_config" not in config and '"float32"' in config

    started = time.monotonic()
    second = runtimes.load(path, version.format)
    second_s = time.monotonic() - started
    assert second_s < first_s / 3, (first_s, second_s)
    assert second.directory == first.directory

    assert second.context_length == 8192 and 2 in second.eos_token_ids  # <|im_end|>
    completion = second.infer({"text_input": np.array([b"The capital of France is"], dtype=np.object_)})
    assert b"Paris" in completion["text_output"][0]
    tok = second.tokenizer
    answer = second.model.greedy(tok.encode(tok.apply_chat_template(CONVERSATIONS[0])), 64, second.eos_token_ids)
    assert 0 < len(answer) < 64  # the model ends its turn with an eos id the runtime knows
    print(f"GGUF first load (conversion) {first_s:.1f} s, cached load {second_s:.1f} s")


@pytest.mark.slow
def test_tampered_cache_is_converted_again(
    llm_home: tuple[Path, dict[str, str]],
    smollm_gguf: Path,
    smollm_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    del llm_home  # loads below use its MAAS_HOME
    directory = gguf_cache.converted_dir(smollm_gguf)  # the registration test's conversion, or a new one
    weights = directory / "model.safetensors"
    with weights.open("r+b") as fh:  # one weight changed, the file's size and header intact
        fh.seek(weights.stat().st_size - 100)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x40]))
    assert gguf_cache.damage(directory) == "model.safetensors changed"

    # Converting again is transformers' 30 s all over; the same files come from the session's conversion instead.
    calls: list[Path] = []

    def from_gguf(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        for file in smollm_dir.iterdir():
            if file.is_file() and file.name != gguf_cache.MANIFEST:
                shutil.copyfile(file, out / file.name)

    monkeypatch.setattr(gguf_cache, "from_gguf", from_gguf)
    runtime = runtimes.load(smollm_gguf, "causal_lm")
    assert calls and runtime.directory == directory and gguf_cache.damage(directory) is None
    assert "damaged" in caplog.text and "model.safetensors changed" in caplog.text


@pytest.mark.slow
def test_chat_template_ids_equal_transformers(smollm_gguf: Path, smollm_dir: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name, local_files_only=True)
    tok = ChatTokenizer(smollm_dir)
    assert tok.eos_token_ids == frozenset({2}) and tok.vocab_size == 49152
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
            text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert tok.encode(text) == list(expected)
            assert tok.decode(tok.encode(text), skip_special=False) == text
            assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode()
    plain = "Hello world, 東京!"
    assert tok.encode(plain, special=True) == reference(plain)["input_ids"]


def test_register_a_directory_with_the_cli(cli_env: dict[str, str], tiny_llm_dir: Path, home: Path) -> None:
    out = maas(cli_env, "models", "register", str(tiny_llm_dir), "--name", "tiny")
    assert "models:/tiny/1 (causal_lm" in out
    assert "causal_lm" in maas(cli_env, "models", "show", "tiny")
    version = Registry(home=home).resolve("tiny")
    runtime = runtimes.load(Registry(home=home).artifact_path(version), version.format)
    assert runtime.infer({"text_input": np.array([b"Hello"], dtype=np.object_)})["text_output"].shape == (1,)


def _convert_slowly(record: Path, source: Path) -> Any:
    def from_gguf(gguf: Path, out: Path) -> None:
        with record.open("a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # the other process arrives while this one converts
        for file in source.iterdir():
            shutil.copyfile(file, out / file.name)

    return from_gguf


def _load_directory(gguf: str, queue: Any) -> None:
    queue.put(str(gguf_cache.converted_dir(Path(gguf))))


def test_two_processes_convert_once(
    tiny_llm_dir: Path, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    record = tmp_path / "conversions.txt"
    monkeypatch.setattr(gguf_cache, "from_gguf", _convert_slowly(record, tiny_llm_dir))
    context = multiprocessing.get_context("fork")  # the children inherit the stand-in conversion
    queue = context.Queue()
    children = [context.Process(target=_load_directory, args=(str(gguf), queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    results = {queue.get(timeout=5) for _ in children}
    assert results == {str(home / "cache" / "causal_lm" / gguf_cache.gguf_digest(gguf))}
    assert len(record.read_text().split()) == 1  # one converted, the other waited and used its result
    assert gguf_cache.damage(Path(results.pop())) is None
