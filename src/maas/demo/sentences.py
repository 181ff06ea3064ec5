"""Varied English sentences, generated deterministically (no download): evaluation and calibration data
for text models such as all-MiniLM-L6-v2."""

from __future__ import annotations

import random

_SUBJECTS = [
    "The engineer",
    "A small team",
    "My neighbour",
    "The new model",
    "Our cluster",
    "The old library",
    "A curious child",
    "The orchestra",
    "This startup",
    "The city council",
    "A migrating bird",
    "The chef",
    "The satellite",
    "Her grandmother",
    "The database",
    "A quiet student",
    "The football club",
    "The river",
]
_VERBS = [
    "rebuilt",
    "ignored",
    "celebrated",
    "measured",
    "painted",
    "sold",
    "explained",
    "delayed",
    "translated",
    "optimised",
    "forgot",
    "discovered",
    "questioned",
    "repaired",
    "visited",
    "compressed",
    "served",
    "reviewed",
]
_OBJECTS = [
    "the quarterly report",
    "a broken bicycle",
    "the northern bridge",
    "an ancient manuscript",
    "the GPU kernels",
    "a spicy tomato soup",
    "the election results",
    "a jazz standard",
    "the winter garden",
    "the inference server",
    "a loud thunderstorm",
    "the chess tournament",
    "a forgotten password",
    "the mountain trail",
    "the vaccine trial",
]
_TAILS = [
    "",
    " yesterday",
    " before sunrise",
    " for the third time",
    " with surprising care",
    " despite the rain",
    " in under a minute",
    " without telling anyone",
    " after a long debate",
    " at the last moment",
]
_QUESTIONS = [
    "How do I reset my password?",
    "Where is the nearest train station?",
    "Why is the sky blue?",
    "What time does the museum open on Sundays?",
    "Can a quantized model be as accurate as the original?",
    "Who wrote the theory of general relativity?",
    "Is it going to snow tomorrow in Oslo?",
]
_SHORT = ["Yes.", "Thanks!", "ok", "Absolutely not.", "GPU", "hello world", "42", "¿Dónde está la biblioteca?"]


def sentences(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` varied sentences: statements of different lengths, questions, fragments, some non-English."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    fixed = _QUESTIONS + _SHORT
    while len(out) < n:
        kind = rng.random()
        if kind < 0.15 and len(seen.intersection(fixed)) < len(fixed):
            text = rng.choice(fixed)
        else:
            parts = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}"]
            while rng.random() < 0.35:  # sometimes a longer, compound sentence
                parts.append(f"{rng.choice(_SUBJECTS).lower()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}")
            text = ", and ".join(parts) + "."
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out
