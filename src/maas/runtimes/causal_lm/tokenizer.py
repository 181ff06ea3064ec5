"""Text <-> token ids for a causal language model, and its chat template: what serving needs around the decoder.

Built from ``tokenizer.json`` with the ``tokenizers`` library (milliseconds; transformers' ``AutoTokenizer`` takes
seconds) and ``tokenizer_config.json``, ``generation_config.json`` and ``config.json`` beside it. The settings
are fixed once here, so threads may share one instance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from maas.errors import InvalidInput
from maas.runtimes.base import brief
from maas.runtimes.causal_lm.chat_template import ChatTemplate
from maas.runtimes.causal_lm.model_dir import chat_template_of
from maas.runtimes.hf.model_dir import read_json

#: Stands for an assistant's reply while probing which token the template ends a turn with.
_PROBE = "\ue000maas-probe\ue001"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte -> the byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(kept), 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(kept, chars, strict=True)}


def _types(node: Any) -> Iterator[str]:
    """Every component ``type`` in a tokenizer.json section (a Sequence nests others)."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"]
        for value in node.values():
            yield from _types(value)
    elif isinstance(node, list):
        for value in node:
            yield from _types(value)


def _token(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object with a content."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _ids(value: object) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class ChatTokenizer:
    """Encode, decode and render chats for the model in ``directory`` (a checked Hugging Face directory)."""

    def __init__(self, directory: Path) -> None:
        root = Path(directory)
        try:
            tok = Tokenizer.from_file(str(root / "tokenizer.json"))
            spec = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
        except Exception as exc:
            raise InvalidInput(f"tokenizer.json is not a tokenizers file: {brief(exc)}") from None
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self._byte_level = "ByteLevel" in set(_types(spec.get("decoder"))) | set(_types(spec.get("pre_tokenizer")))
        self._byte_decoder = _byte_decoder()
        added = [
            t
            for t in spec.get("added_tokens") or []
            if isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)
        ]
        self._added: dict[int, str] = {t["id"]: t["content"] for t in added}
        self._special = {t["id"] for t in added if t.get("special")}
        config = _json(root / "tokenizer_config.json")
        self.bos_token: str | None = _token(config.get("bos_token"))
        self.eos_token: str | None = _token(config.get("eos_token"))
        source = chat_template_of(root)
        if source is None:
            raise InvalidInput("the model has no chat template; add one and register again")
        self.chat_template = ChatTemplate(source)
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        eos = set(_ids(_json(root / "generation_config.json").get("eos_token_id")))
        eos.update(_ids(_json(root / "config.json").get("eos_token_id")))
        if self.eos_token is not None and (found := tok.token_to_id(self.eos_token)) is not None:
            eos.add(found)
        turn_end = self._turn_end()
        if turn_end is not None:
            eos.add(turn_end)
        #: Ids that end a generation: the eos of the tokenizer, config and generation config, and the special
        #: token the chat template ends an assistant turn with.
        self.eos_token_ids: frozenset[int] = frozenset(i for i in eos if 0 <= i < self.vocab_size)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``. ``special``: add the tokenizer's own special tokens (a BOS, as its post-processor
        says), as for a raw completion prompt; a rendered chat template carries them already. Special-token text
        inside ``text`` (``<|im_start|>``) is always read as that special token, as transformers does."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=special).ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=skip_special)
        return text

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (a piece of a multi-byte character decodes to U+FFFD)."""
        return self.decode([token_id], skip_special=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (byte-level tokens may hold part of a UTF-8 character);
        b"" for an id the tokenizer does not know."""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        match = _BYTE_TOKEN.fullmatch(piece)  # sentencepiece byte fallback
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **context: Any
    ) -> str:
        """The prompt for ``messages`` as the model's chat template renders it (``context``: extra template
        variables, such as ``tools``). Encode it with :meth:`encode` (no ``special``)."""
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **context,
        )

    def _turn_end(self) -> int | None:
        """The special token the template puts right after an assistant's message (``<|im_end|>``, ``<|eot_id|>``),
        found by rendering a probe reply; None when the template says nothing there or refuses the probe."""
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self.apply_chat_template(messages, add_generation_prompt=False)
        except InvalidInput:
            return None
        _, found, after = text.partition(_PROBE)
        if not found or not after:
            return None
        ids = self.encode(after)
        return ids[0] if ids and ids[0] in self._special else None


def _json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}
