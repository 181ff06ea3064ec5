"""Token ids to text as a generation runs: incremental detokenising and stop strings.

:class:`Detokenizer` emits text only once it is complete. A character split across tokens (byte-level BPE spells
an emoji in several) decodes to U+FFFD until its last byte arrives, and a tokenizer may render a token differently
beside its neighbours (SentencePiece drops a leading space at the start of a text), so each step decodes a short
window of ids twice, the ids already shown and the same plus the new ones, and emits what the second adds (the
prefix/read offsets of vLLM and TGI).

:class:`StopMatcher` keeps stop strings out of the text: it holds back any tail that could still become a stop
string and, once one is complete, cuts the text before it. Each stop string has a Knuth-Morris-Pratt automaton
whose state (the longest tail that is a prefix of it) moves with each character, so the check costs the same
however the text is split into tokens, and the result does not depend on the split either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

#: Prompt ids decoded in front of the first generated token (for the spacing the tokenizer gives it in context).
PROMPT_CONTEXT = 5
#: Ids that may stay undecoded while their text ends in an incomplete character; past that the bytes are not UTF-8
#: that later tokens could complete (a character is at most 4 bytes) and the replacement character is emitted.
MAX_PENDING = 8
REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str: ...


class Detokenizer:
    """Generated token ids in, the text they add out (see the module docstring). Not thread-safe."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        context = list(prompt_ids[-PROMPT_CONTEXT:])
        self._ids = context  # the window: decoded context, then ids not yet shown
        self._prefix = 0  # window[prefix:read] has been shown
        self._read = len(context)
        #: Characters emitted so far.
        self.length = 0

    def push(self, token_id: int) -> str:
        """The text ``token_id`` completes (often all of its own, sometimes none yet, sometimes more)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held at the end of the generation (an incomplete character becomes U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        shown = self.tokenizer.decode(self._ids[self._prefix : self._read])
        full = self.tokenizer.decode(self._ids[self._prefix :])
        pending = len(self._ids) - self._read
        give_up = final or pending >= MAX_PENDING
        if len(full) > len(shown) and (give_up or not full.endswith(REPLACEMENT)):
            delta = full[len(shown) :]
        elif give_up:
            delta = ""  # nothing to show (skipped special tokens); move on so the window stays short
        else:
            return ""  # an incomplete character (or no text yet): wait for the next id
        # The ids just shown are the next window's context.
        self._ids = self._ids[self._read :]
        self._prefix, self._read = 0, len(self._ids)
        self.length += len(delta)
        return delta


class StopMatcher:
    """Text in, text that cannot belong to a stop string out (see the module docstring)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._tables = [_failure(s) for s in self.stops]
        self._states = [0] * len(self.stops)
        self._held = ""
        #: True once a stop string matched; no text comes out after that.
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of what came so far that is safe to show: before a stop string that matched, or all but the tail
        that could still start one."""
        if self.stopped or not text:
            return ""
        if not self.stops:
            return text
        held = self._held + text
        base = len(self._held)
        for offset, char in enumerate(text):
            match = -1
            for k, (stop, table) in enumerate(zip(self.stops, self._tables, strict=True)):
                state = self._states[k]
                while state and stop[state] != char:
                    state = table[state - 1]
                if stop[state] == char:
                    state += 1
                if state == len(stop):
                    start = base + offset + 1 - len(stop)
                    match = start if match < 0 else min(match, start)
                    state = table[state - 1]
                self._states[k] = state
            if match >= 0:
                self.stopped = True
                self._held = ""
                return held[:match]
        keep = max(self._states)
        cut = len(held) - keep
        self._held = held[cut:]
        return held[:cut]

    def flush(self) -> str:
        """The held-back tail, at the end of a generation no stop string ended."""
        if self.stopped:
            return ""
        out, self._held = self._held, ""
        self._states = [0] * len(self.stops)
        return out


def _failure(pattern: str) -> list[int]:
    """KMP's failure function: for each prefix, the length of its longest proper prefix that is also its suffix."""
    table = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return table


class TextStream:
    """One choice's text: generated ids in, the text to send out, with stop strings applied."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = (), stops: Sequence[str] = ()) -> None:
        self.detokenizer = Detokenizer(tokenizer, prompt_ids)
        self.matcher = StopMatcher(stops)
        #: Characters sent out so far (the text the client sees).
        self.sent = 0

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    @property
    def decoded(self) -> int:
        """Characters decoded so far, stop strings not applied (the offset of the next token's text)."""
        return self.detokenizer.length

    def push(self, token_id: int) -> str:
        return self._out(self.matcher.feed(self.detokenizer.push(token_id)))

    def finish(self) -> str:
        """The rest of the text once the generation has ended."""
        text = self.matcher.feed(self.detokenizer.flush())
        return self._out(text + self.matcher.flush())

    def _out(self, text: str) -> str:
        self.sent += len(text)
        return text
