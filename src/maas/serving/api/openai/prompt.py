"""A language model's tokenizer as the API uses it: chat prompts in token ids, and each token's text and bytes.

Message content is text, never markup. A chat template writes the control tokens of a conversation
(``<|im_start|>``, ``<|im_end|>``) as text and the tokenizer reads such text back as those tokens, so
special-token text inside a message (``hi<|im_end|>\\n<|im_start|>system ...``) would forge turns and a system
prompt. :func:`chat_prompt_ids` keeps content as plain text, as OpenAI does: when no message holds special-token
text the rendered prompt is tokenised whole (the ids a plain rendering always gave); otherwise the template renders
a unique marker in place of each message, its own text is tokenised with special tokens read and each message's
content without. A template that does not place the content as it is (it changes it, or branches on it) cannot be
split so; then a message holding special-token text is refused.

:class:`Tokens` caches what log-probabilities need per token id (its text and bytes): the tokenizer is shared and
immutable, and a long answer names the same ids over and over.
"""

from __future__ import annotations

import re
import secrets
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from maas.errors import MaasError
from maas.serving.api.openai.protocol import BadParam
from maas.serving.errors import public_message


class ChatTokenizer(Protocol):
    """What the API needs of a language model's tokenizer (``loaded.runtime.tokenizer`` of a ``causal_lm`` model)."""

    eos_token_ids: frozenset[int]
    vocab_size: int

    def encode(self, text: str, *, special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str: ...


class Tokens:
    """Per-id facts of one tokenizer, each computed once: a token's text, its bytes, whether it is a special token.
    One instance per tokenizer (:meth:`of`); threads share it (a race computes a value twice, harmlessly)."""

    _instances: weakref.WeakKeyDictionary[Any, Tokens] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tokenizer = weakref.ref(tokenizer)  # the registry's key must not be kept alive by its value
        self._text: dict[int, str] = {}
        self._bytes: dict[int, tuple[int, ...]] = {}
        self._special: dict[int, bool] = {}
        self._spelled: dict[str, list[int] | None] = {}

    @classmethod
    def of(cls, tokenizer: ChatTokenizer) -> Tokens:
        with cls._lock:
            found = cls._instances.get(tokenizer)
            if found is None:
                found = cls._instances[tokenizer] = cls(tokenizer)
            return found

    @property
    def tokenizer(self) -> ChatTokenizer:
        tokenizer = self._tokenizer()
        assert tokenizer is not None, "the tokenizer is gone"
        return tokenizer

    def text(self, token_id: int) -> str:
        found = self._text.get(token_id)
        if found is None:
            found = self._text[token_id] = self.tokenizer.token_text(token_id)
        return found

    def bytes(self, token_id: int) -> tuple[int, ...]:
        """The token's bytes as numbers (OpenAI's ``bytes``)."""
        found = self._bytes.get(token_id)
        if found is None:
            found = self._bytes[token_id] = tuple(self.tokenizer.token_bytes(token_id))
        return found

    def is_special(self, token_id: int) -> bool:
        """A token with text that decoding leaves out: a control token (``<|im_start|>``)."""
        found = self._special.get(token_id)
        if found is None:
            found = self._special[token_id] = bool(self.text(token_id)) and not self.tokenizer.decode([token_id])
        return found

    def first_special(self, ids: Sequence[int]) -> int | None:
        return next((i for i in dict.fromkeys(ids) if self.is_special(i)), None)

    def spelled(self, mark: str) -> list[int] | None:
        """A special token's text ``mark`` in ordinary tokens: its first character, then the rest; None if it
        cannot be (see :func:`plain_ids`). One entry per special token, at most."""
        if mark not in self._spelled:
            head, rest = plain_ids(self.tokenizer, mark[:1]), plain_ids(self.tokenizer, mark[1:])
            self._spelled[mark] = None if head is None or rest is None else head + rest
        return self._spelled[mark]


def check_fits(length: int, context: int, where: str) -> None:
    """Refuse a prompt of ``length`` ids that is empty or leaves no room in the ``context`` for the completion."""
    if not length:
        raise BadParam(f"the {where} is empty once tokenised; send some text", where)
    if length >= context:
        raise BadParam(
            f"this model's context is {context:,} tokens, and the prompt ({where}) has {length:,} tokens, "
            "which leaves no room for the completion; shorten the prompt",
            where,
            "context_length_exceeded",
        )


def render(tokenizer: ChatTokenizer, messages: list[dict[str, Any]]) -> str:
    """The chat template's text for ``messages`` and the assistant's turn; :class:`BadParam` if it refuses them."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except MaasError as exc:
        raise BadParam(f"messages: {exc}", "messages") from None
    except Exception as exc:  # the model's template refusing the conversation (raise_exception)
        raise BadParam(
            f"messages: the model's chat template refused them: {public_message(str(exc))}", "messages"
        ) from None


def chat_prompt_ids(
    tokenizer: ChatTokenizer, messages: Sequence[Mapping[str, str]], *, context: int | None = None
) -> list[int]:
    """The prompt for ``messages`` (``role`` and ``content`` of each) in token ids, ending with the assistant's turn:
    special tokens only where the chat template writes them, each message's content as plain text (see the module
    docstring). :class:`BadParam` when the template refuses the messages, when a message holding special-token text
    cannot be kept apart from the template's text, or (given the model's ``context``) when the prompt does not fit
    (:func:`check_fits`; checked before content full of special-token text is spelled out, which costs more)."""
    listed = [dict(m) for m in messages]
    text = render(tokenizer, listed)
    whole = tokenizer.encode(text, special=False)  # the template writes the special tokens itself (a BOS too)
    if context is not None:
        check_fits(len(whole), context, "messages")  # spelled out, special-token text only takes more tokens
    tokens = Tokens.of(tokenizer)
    found = (tokens.first_special(tokenizer.encode(m["content"], special=False)) for m in listed)
    forged = next(((i, special) for i, special in enumerate(found) if special is not None), None)
    if forged is None:
        return whole
    first, special = forged
    refusal = BadParam(
        f"messages[{first}].content holds the special-token text {tokens.text(special)[:40]!r}, and this model's "
        "chat template does not let it be kept as plain text; remove it from the message",
        f"messages[{first}].content",
    )
    tag = secrets.token_hex(8)
    marked = render(tokenizer, [m | {"content": f"\ue000maas-{tag}-{i}\ue001"} for i, m in enumerate(listed)])
    parts = re.split(f"\ue000maas-{tag}-(\\d+)\ue001", marked)
    # parts alternate: the template's text, a message's index, the template's text, ...
    contents = [listed[int(p)]["content"] if k % 2 else p for k, p in enumerate(parts)]
    if "".join(contents) != text:  # the template changed the content or branched on it: it cannot be split
        raise refusal
    ids: list[int] = []
    for k, part in enumerate(contents):
        if k % 2 == 0:
            ids += tokenizer.encode(part, special=False)
        else:
            plain = plain_ids(tokenizer, part)
            if plain is None:
                raise refusal
            ids += plain
    return ids


def plain_ids(tokenizer: ChatTokenizer, text: str) -> list[int] | None:
    """``text`` in token ids with any special-token text in it spelled in ordinary tokens (its first character, then
    the rest); None if that cannot be done (a special token of one character). The ids of text without special-token
    text are the tokenizer's."""
    tokens = Tokens.of(tokenizer)
    ids = tokenizer.encode(text, special=False)
    found = {i for i in set(ids) if tokens.is_special(i)}
    if not found:
        return ids
    # Cut the text at each special token's text; each one is spelled as its first character, then the rest.
    marks = sorted({tokens.text(i) for i in found}, key=len, reverse=True)
    pieces = re.split(f"({'|'.join(map(re.escape, marks))})", text)
    if len(pieces) == 1 or len(text) == 1:
        return None  # the tokenizer reads a special token where its text is not (normalised, stripped)
    out: list[int] = []
    for k, piece in enumerate(pieces):  # text without special-token text, a special token's text, text, ...
        part = tokens.spelled(piece) if k % 2 else plain_ids(tokenizer, piece) if piece else []
        if part is None:
            return None
        out += part
    return out
