"""Texts -> token ids, as the model directory's ``tokenizer.json`` says, with bounded work per text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Encoding
from tokenizers import Tokenizer as _RustTokenizer

from maas.errors import InvalidInput
from maas.runtimes.base import brief
from maas.runtimes.hf.archive import unpack
from maas.runtimes.hf.model_dir import read_json, read_model_dir

#: Characters added to the first cut of a long text, and how many times longer the last cut may be.
_CUT_SLACK, _MAX_GROWTH = 256, 16


class Tokenizer:
    """Texts -> the feed the transformer (and the exported ONNX graph) takes.

    ``encode(texts)`` returns ``input_ids``, ``attention_mask`` and ``token_type_ids`` as int64
    ``[len(texts), longest]`` arrays: truncated to the model's ``max_seq_length``, padded to the longest
    text. The settings are fixed here once and never changed afterwards, so threads may share one
    instance (the Rust tokenizer only refuses concurrent use while its settings change).

    A long text is cut before it is tokenized (tokenizing is linear in the text, in time and memory, and
    all but ``max_length`` tokens are thrown away): first to ``max_length`` times the longest vocabulary
    token, plus some slack, which holds more tokens than the model uses unless most of the text yields
    none (whitespace, accents). The cut is kept only when the tokens kept all come from words before the
    last word of the cut text, so the cut did not change them; else the text is cut four times longer,
    up to ``_MAX_GROWTH`` times the first cut, where the cut is kept whatever it holds.
    """

    def __init__(self, directory: Path) -> None:
        info = read_model_dir(unpack(Path(directory)))
        self.max_length = info.max_length
        self._lowercase = info.lowercase
        try:
            tok = _RustTokenizer.from_file(str(info.root / "tokenizer.json"))
        except Exception as exc:
            raise InvalidInput(f"tokenizer.json is not a tokenizers file: {brief(exc)}") from None
        # tokenizer.json often carries fixed-length padding and another truncation length (MiniLM: 128).
        tok.enable_truncation(max_length=info.max_length)
        tok.no_padding()  # encode() pads, to the longest text
        self._pad_id = tok.token_to_id(_pad_token(info.root, tok)) or 0
        longest = max((len(t) for t in tok.get_vocab()), default=1)
        self._cut = info.max_length * max(longest, 1) + _CUT_SLACK
        self._tok = tok

    def _encode(self, texts: Sequence[str]) -> list[Encoding]:
        limits = [self._cut] * len(texts)
        out: list[Encoding] = [None] * len(texts)  # type: ignore[list-item]
        todo = list(range(len(texts)))
        while todo:
            pieces = [texts[i][: limits[i]] for i in todo]
            if self._lowercase:  # after the cut: lower() of the whole text would copy all of it
                pieces = [p.lower() for p in pieces]
            for i, encoding in zip(todo, self._tok.encode_batch(pieces), strict=True):
                out[i] = encoding
            todo = [
                i
                for i in todo
                if len(texts[i]) > limits[i] and limits[i] < self._cut * _MAX_GROWTH and not _cut_is_unseen(out[i])
            ]
            for i in todo:
                limits[i] *= 4
        return out

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self._encode(texts)
        width = max((len(e.ids) for e in encodings), default=0)

        def column(rows: list[list[int]], pad: int) -> np.ndarray:
            array = np.full((len(rows), width), pad, dtype=np.int64)
            for row, values in zip(array, rows, strict=True):
                row[: len(values)] = values
            return array

        return {
            "input_ids": column([e.ids for e in encodings], self._pad_id),
            "attention_mask": column([e.attention_mask for e in encodings], 0),
            "token_type_ids": column([e.type_ids for e in encodings], 0),
        }


def _cut_is_unseen(encoding: Encoding) -> bool:
    """True when every kept token of a cut text's encoding comes from a word before the cut text's last word
    (the one the cut may have split), so the whole text starts with the same tokens."""
    if not encoding.overflowing:
        return False  # all of the cut text fits: the rest of the text might have added tokens
    kept = [w for w in encoding.word_ids if w is not None]
    rest = [w for o in encoding.overflowing for w in o.word_ids if w is not None]
    return bool(kept) and bool(rest) and max(kept) < max(rest)


def _pad_token(root: Path, tok: _RustTokenizer) -> str:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (root / name).is_file():
            value = read_json(root / name).get("pad_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and tok.token_to_id(value) is not None:
                return value
    return next((t for t in ("[PAD]", "<pad>") if tok.token_to_id(t) is not None), "[PAD]")


def encode(directory: Path, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Tokenize ``texts`` as the model in ``directory`` (or its packed zip) does: the ONNX feed of
    :class:`Tokenizer`. Builds a tokenizer per call; keep a :class:`Tokenizer` for repeated use."""
    return Tokenizer(directory).encode(texts)
