"""The Llama decoder (against transformers' own implementation) and the continuous-batching engine on a small random
model: batched greedy equals one-at-a-time greedy exactly, seeds reproduce, cancel frees at once, bounded queues."""

from __future__ import annotations

import asyncio
import copy
import gc
import weakref
from typing import Any

import pytest
import torch

from maas.errors import InvalidInput, RateLimited
from maas.runtimes.causal_lm.model import DecoderLM, LMConfig
from maas.runtimes.causal_lm.precision import OneDnnLinear
from maas.serving.llm.engine import BatchingEngine, EngineLimits
from maas.serving.llm.types import GenerationRequest, SamplingParams

#: SmolLM2-135M's layer shapes (the batch invariance of CPU matrix kernels depends on them), two layers, tiny vocab.
HF_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 97,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 2,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def hf_pair() -> tuple[Any, DecoderLM]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).eval()
    ours = DecoderLM(LMConfig.from_hf(HF_CONFIG))
    ours.load_hf_state(hf.state_dict())
    return hf, ours.eval()


@pytest.fixture(scope="module", params=["torch kernels", "oneDNN"])
def model(hf_pair: tuple[Any, DecoderLM], request: pytest.FixtureRequest) -> DecoderLM:
    """The decoder with torch's default linear kernels, and as it is served (float32 layers run by oneDNN)."""
    if request.param == "torch kernels":
        return hf_pair[1]
    served = copy.deepcopy(hf_pair[1]).with_weights("float32")
    if not isinstance(served.lm_head, OneDnnLinear):
        pytest.skip("oneDNN's linear kernel is unavailable or not batch-invariant on this machine")
    assert all(isinstance(getattr(b, n), OneDnnLinear) for b in served.layers for n in ("qkv", "o", "gate_up", "down"))
    return served


def prompts(n: int) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(1)
    return [
        tuple(int(t) for t in torch.randint(3, 97, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g))
        for _ in range(n)
    ]


def greedy(max_tokens: int, stop: frozenset[int] = frozenset()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop)


async def collect(engine: BatchingEngine, prompt: tuple[int, ...], params: SamplingParams) -> tuple[list[int], Any]:
    gen = engine.submit(GenerationRequest(prompt, params))
    tokens, last = [], None
    async for event in gen:
        if event.token_id is not None:
            tokens.append(event.token_id)
        last = event
    return tokens, last


def test_logits_match_transformers(hf_pair: tuple[Any, DecoderLM], model: DecoderLM) -> None:
    hf, ours = hf_pair[0], model
    ids = [*prompts(1)[0], 5, 6, 7]
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    cache = ours.new_cache(len(ids))
    got_prefill = ours.prefill(ids[:-3], cache)
    assert torch.allclose(got_prefill[0], want[-4], atol=1e-4)
    for offset, token in enumerate(ids[-3:]):  # token by token through decode, as the engine runs them
        step = ours.decode([token], [cache])
        assert torch.allclose(step[0], want[len(ids) - 3 + offset], atol=1e-4)


def test_bfloat16_weights_stay_close_to_float32(hf_pair: tuple[Any, DecoderLM]) -> None:
    model = hf_pair[1]
    light = copy.deepcopy(model).with_weights("bfloat16")
    assert light.blocks[0].qkv.weight.dtype == torch.bfloat16 and light.embed.weight.dtype == torch.float32
    ids = list(prompts(1)[0])
    full, low = model.prefill(ids, model.new_cache(64)), light.prefill(ids, light.new_cache(64))
    assert low.dtype == torch.float32 and torch.allclose(full, low, atol=0.05)
    with pytest.raises(InvalidInput, match="auto, float32 or bfloat16"):
        copy.deepcopy(model).with_weights("int4")


def test_refuses_other_architectures() -> None:
    with pytest.raises(InvalidInput, match="model_type 'gpt2' is not supported"):
        LMConfig.from_hf({**HF_CONFIG, "model_type": "gpt2"})


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "bfloat16 weights"])
def test_a_rows_result_does_not_depend_on_the_batch(
    hf_pair: tuple[Any, DecoderLM], model: DecoderLM, precision: str
) -> None:
    if precision == "bfloat16":
        model = copy.deepcopy(hf_pair[1]).to(torch.bfloat16)
    elif precision == "bfloat16 weights":
        model = copy.deepcopy(hf_pair[1]).with_weights("bfloat16")
    seqs = prompts(6)
    alone = []
    for s in seqs:
        cache = model.new_cache(64)
        model.prefill(list(s), cache)
        alone.append(model.decode([9], [cache])[0])
    caches = [model.new_cache(64) for _ in seqs]
    for s, c in zip(seqs, caches, strict=True):
        model.prefill(list(s), c)
    batch = model.decode([9] * len(seqs), caches)
    for row, single in enumerate(alone):
        assert torch.equal(batch[row], single)


def test_one_pass_for_a_prompt_chunk_and_decoding_rows_gives_what_separate_passes_give(model: DecoderLM) -> None:
    seqs, chunk = prompts(5), list(prompts(9)[8])

    def caches() -> list[Any]:
        out = []
        for s in seqs:
            cache = model.new_cache(64)
            model.prefill(list(s), cache)
            out.append(cache)
        return out

    apart, together = caches(), caches()
    alone_cache, fused_cache = model.new_cache(64), model.new_cache(64)
    want_rows, want_last = model.decode([7] * 5, apart), model.prefill(chunk, alone_cache)
    rows, last = model.step([7] * 5, together, chunk, fused_cache)
    assert torch.equal(rows, want_rows) and last is not None and torch.equal(last, want_last)
    assert fused_cache.length == alone_cache.length == len(chunk)
    assert torch.equal(fused_cache.k[:, :, : len(chunk)], alone_cache.k[:, :, : len(chunk)])


def test_batched_greedy_equals_sequential_greedy(model: DecoderLM) -> None:
    seqs = prompts(8)
    want = [model.greedy(list(s), 16) for s in seqs]

    async def run() -> list[list[int]]:
        engine = BatchingEngine(model, 97, kv_bytes_per_token=model.kv_bytes_per_token)
        try:
            results = await asyncio.gather(*(collect(engine, s, greedy(16)) for s in seqs))
            alone, _ = await collect(engine, seqs[3], greedy(16))
            assert alone == want[3]
            return [tokens for tokens, _ in results]
        finally:
            await engine.close()

    assert asyncio.run(run()) == want


def test_finish_reasons_and_stop_ids(model: DecoderLM) -> None:
    seq = prompts(1)[0]
    free = model.greedy(list(seq), 12)

    async def run() -> None:
        engine = BatchingEngine(model, 97)
        try:
            tokens, last = await collect(engine, seq, greedy(12))
            assert tokens == free and last.finish_reason == "length" and last.token_id == free[-1]
            stop = free[5]
            tokens, last = await collect(engine, seq, greedy(12, frozenset({stop})))
            assert tokens == free[: free.index(stop)] and stop not in tokens
            assert last.finish_reason == "stop" and last.token_id is None
        finally:
            await engine.close()

    asyncio.run(run())


def test_seeds_reproduce_and_logprobs_are_consistent(model: DecoderLM) -> None:
    seq = prompts(1)[0]

    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=16, temperature=1.3, top_p=0.9, seed=seed, logprobs=3, frequency_penalty=0.5)

    async def run() -> None:
        engine = BatchingEngine(model, 97)
        try:
            a, b, c = await asyncio.gather(*(collect(engine, seq, params(s)) for s in (7, 7, 8)))
            assert a[0] == b[0] and a[0] != c[0]
            gen = engine.submit(GenerationRequest(seq, params(7)))
            async for event in gen:
                if event.token_id is None:
                    continue
                values = [lp for _, lp in event.top_logprobs]
                assert len(values) == 3 and values == sorted(values, reverse=True)
                assert event.logprob is not None and event.logprob <= values[0] + 1e-6
        finally:
            await engine.close()

    asyncio.run(run())


def test_cancel_frees_the_slot_and_the_cache_at_once(model: DecoderLM) -> None:
    async def run() -> None:
        engine = BatchingEngine(model, 97, limits=EngineLimits(max_running=4))
        try:
            gens = [engine.submit(GenerationRequest(s, greedy(200))) for s in prompts(10)]
            caches = []
            for gen in gens[:4]:
                async for _ in gen:
                    break  # one token: it is running
                caches.append(weakref.ref(gen.cache))  # type: ignore[attr-defined]
            for gen in gens:
                gen.cancel()
            for _ in range(200):
                if engine.running == 0 and engine.queued == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.running == 0 and engine.queued == 0
            gc.collect()
            assert all(ref() is None for ref in caches)
            assert all(gen.usage.completion_tokens < 200 for gen in gens)  # type: ignore[attr-defined]
        finally:
            await engine.close()

    asyncio.run(run())


def test_bounded_queue_and_context(model: DecoderLM) -> None:
    async def run() -> None:
        engine = BatchingEngine(model, 97, limits=EngineLimits(max_running=1, max_queue=2))
        try:
            gens = []
            with pytest.raises(RateLimited, match="MAAS_LLM_MAX_QUEUE"):  # one running and two waiting at most
                for _ in range(4):
                    gens.append(engine.submit(GenerationRequest((5, 6), greedy(200))))
            assert 2 <= len(gens) <= 3
            with pytest.raises(InvalidInput, match="context of 256 tokens"):
                engine.submit(GenerationRequest(tuple(range(3, 90)) * 3, greedy(10)))
            with pytest.raises(InvalidInput, match=r"0\.\.96"):
                engine.submit(GenerationRequest((5, 500), greedy(10)))
            for gen in gens:
                gen.cancel()
        finally:
            await engine.close()

    asyncio.run(run())
