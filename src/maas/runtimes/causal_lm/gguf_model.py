"""Whether a GGUF file is a model maas can convert and run, told from its header alone (no tensor is dequantised).

:func:`check_gguf` reads the header with :func:`~maas.runtimes.causal_lm.gguf_header.read_header` (bounded, every
extent checked), then requires a Llama-architecture model with default rotary positions, a tokenizer, a chat
template that compiles, tensor types the ``gguf`` package can dequantise and as many weights as the metadata
describes; last, ``gguf``'s own reader (the one transformers converts with) must read the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maas.errors import InvalidInput, UnsupportedFormat
from maas.runtimes.base import brief
from maas.runtimes.causal_lm.chat_template import ChatTemplate
from maas.runtimes.causal_lm.gguf_header import GGUFHeader, read_header

#: GGUF ``general.architecture`` values maas converts (llama.cpp stores Mistral models as ``llama`` too).
ARCHITECTURES = ("llama",)
#: ``tokenizer.ggml.model`` values transformers turns into a fast tokenizer for these architectures.
TOKENIZER_MODELS = ("gpt2", "llama")
_SLACK = 1.05


@dataclass(frozen=True)
class GGUFModel:
    architecture: str
    context_length: int
    chat_template: str


def check_gguf(path: Path) -> GGUFModel:
    """Check the GGUF file at ``path`` (see the module docstring); ``InvalidInput`` or ``UnsupportedFormat``
    naming what is wrong and what to do."""
    shown = path.name
    header = read_header(path)
    arch = header.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedFormat(
            f"{shown} holds a {str(arch)[:40]!r} model; maas runs GGUF models of architecture "
            f"{', '.join(ARCHITECTURES)} (Llama's layout: Llama, SmolLM, Mistral, TinyLlama...)"
        )
    scaling = header.get(f"{arch}.rope.scaling.type")
    if (scaling not in (None, "none")) or any(t.name == "rope_freqs.weight" for t in header.tensors):
        raise UnsupportedFormat(
            f"{shown} uses scaled rotary positions ({scaling or 'rope_freqs'}); maas implements the default "
            "rotary embedding only"
        )
    if "tokenizer.ggml.tokens" not in header.arrays or header.get("tokenizer.ggml.model") not in TOKENIZER_MODELS:
        raise InvalidInput(
            f"{shown} has no tokenizer maas can build (tokenizer.ggml.tokens with tokenizer.ggml.model "
            f"{' or '.join(TOKENIZER_MODELS)}); convert the model again with llama.cpp's convert_hf_to_gguf.py"
        )
    template = header.get("tokenizer.chat_template")
    if not isinstance(template, str) or not template.strip():
        raise InvalidInput(
            f"{shown} has no chat template (tokenizer.chat_template); maas serves chat models only: add one with "
            "llama.cpp's gguf_new_metadata.py --chat-template-file and register again"
        )
    ChatTemplate(template)
    context = header.get(f"{arch}.context_length")
    if type(context) is not int or context <= 0:
        raise InvalidInput(f"{shown}: {arch}.context_length is {context!r}; expected a positive integer")
    _check_types(header, shown)
    _check_size(header, str(arch), shown)
    try:
        from gguf import GGUFReader

        GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as exc:
        raise InvalidInput(f"{shown}: the gguf reader refuses the file ({brief(exc)}); convert it again") from None
    return GGUFModel(str(arch), context, template)


def _check_types(header: GGUFHeader, shown: str) -> None:
    """Every tensor type must be one the ``gguf`` package dequantises (tried on one zero block of each)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    for raw in sorted({t.ggml_type for t in header.tensors}):
        qtype = GGMLQuantizationType(raw)
        _, block_bytes = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError) as exc:
            raise UnsupportedFormat(
                f"{shown} holds {qtype.name} tensors, which cannot be dequantised here ({brief(exc)}); use a GGUF "
                "file with another quantisation (Q4_0, Q4_K_M, Q8_0, F16...)"
            ) from None


def _check_size(header: GGUFHeader, arch: str, shown: str) -> None:
    """The metadata's dimensions must describe no more weights than the tensors hold: the model is allocated from
    the metadata before any weight is read."""

    def dim(key: str, default: int | None = None) -> int:
        value = header.get(f"{arch}.{key}", default)
        if type(value) is not int or value <= 0:
            raise InvalidInput(f"{shown}: {arch}.{key} is {value!r}; expected a positive integer")
        return value

    hidden, heads = dim("embedding_length"), dim("attention.head_count")
    kv = dim("attention.head_count_kv", heads)
    head_dim = dim("attention.key_length", hidden // heads or 1)
    vocab = header.get(f"{arch}.vocab_size") or header.arrays.get("tokenizer.ggml.tokens", 0)
    if type(vocab) is not int or vocab <= 0:
        raise InvalidInput(f"{shown}: the vocabulary size is {vocab!r}; expected a positive integer")
    tied = all(t.name != "output.weight" for t in header.tensors)
    per_layer = (
        hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden + 3 * hidden * dim("feed_forward_length")
    )
    implied = vocab * hidden * (1 if tied else 2) + dim("block_count") * per_layer
    held = sum(math.prod(t.dims) for t in header.tensors)
    if implied > held * _SLACK + 1_000_000:
        raise InvalidInput(
            f"{shown}: its metadata describes about {implied:,} parameters but its tensors hold {held:,}; the file "
            "is damaged or inconsistent: convert it again"
        )
