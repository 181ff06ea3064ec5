"""Whether a GGUF file is a model maas can convert and run, told from its header alone (no tensor is dequantised).

:func:`check_gguf` reads the header with :func:`~maas.runtimes.causal_lm.gguf_header.read_header` (bounded, every
extent checked), then requires a Llama-architecture model with default rotary positions, a tokenizer, a chat
template that compiles, tensor types the ``gguf`` package can dequantise, and every dimension transformers takes
from the metadata (hidden size, heads, head size, layers, feed-forward size, vocabulary) equal to the shapes of the
tensors that hold those weights: the conversion allocates the model from the metadata, so nothing it allocates
exceeds what the file holds. ``gguf``'s own reader is not run here: it costs about a kilobyte per metadata array
element, and the header walk checks all it relies on (transformers runs it when converting, within those bounds).
"""

from __future__ import annotations

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
#: Longest context a GGUF may declare (far above any real model's; Llama 4 Scout's is 10M tokens).
MAX_CONTEXT = 1 << 24


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
    if type(context) is not int or not 0 < context <= MAX_CONTEXT:
        raise InvalidInput(
            f"{shown}: {arch}.context_length is {context!r}; expected a positive integer up to {MAX_CONTEXT:,}"
        )
    _check_types(header, shown)
    _check_shapes(header, str(arch), shown)
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


def _check_shapes(header: GGUFHeader, arch: str, shown: str) -> None:
    """transformers builds the model from the metadata (``embedding_length`` as the hidden size,
    ``rope.dimension_count`` as the head size...) before it reads a weight: every dimension it takes must be the
    shape of the tensors that hold those weights, so that it allocates nothing the file's tensors do not hold."""
    tensors = {t.name: t.dims for t in header.tensors}

    def fail(what: str) -> InvalidInput:
        return InvalidInput(f"{shown}: {what}; the file is damaged or inconsistent: convert it again")

    def dim(key: str, default: int | None = None) -> int:
        if key in header.arrays:
            raise fail(f"{key} is an array, not a number")
        value = header.get(key, default)
        if type(value) is not int or value <= 0:
            raise InvalidInput(f"{shown}: {key} is {value!r}; expected a positive integer")
        return value

    hidden, heads = dim(f"{arch}.embedding_length"), dim(f"{arch}.attention.head_count")
    layers, ffn = dim(f"{arch}.block_count"), dim(f"{arch}.feed_forward_length")
    kv = dim(f"{arch}.attention.head_count_kv", heads)
    if heads % kv:
        raise fail(f"{heads} attention heads cannot share {kv} key/value heads")
    # transformers' head_dim: rope.dimension_count, else hidden // heads (llama.cpp's key_length and value_length).
    head_dim = dim(f"{arch}.rope.dimension_count", hidden // heads or None)
    for key in (f"{arch}.attention.key_length", f"{arch}.attention.value_length"):
        if (key in header.metadata or key in header.arrays) and dim(key) != head_dim:
            raise fail(f"{key} is {header.get(key)} but the head size (rope.dimension_count) is {head_dim}")
    tokens = header.arrays.get("tokenizer.ggml.tokens", 0)
    vocab = dim(f"{arch}.vocab_size", tokens or None)  # as transformers: else the number of tokens
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in header.arrays and header.arrays[key] != vocab:
            raise fail(f"{key} holds {header.arrays[key]:,} entries for a vocabulary of {vocab:,} tokens")
    if layers * len(_LAYER) + 2 > len(tensors):
        raise fail(f"its metadata describes {layers:,} layers, more than its {len(tensors):,} tensors can hold")
    expected = {"token_embd.weight": (hidden, vocab), "output_norm.weight": (hidden,)}
    if "output.weight" in tensors:
        expected["output.weight"] = (hidden, vocab)
    sizes = {"hidden": hidden, "q": heads * head_dim, "kv": kv * head_dim, "ffn": ffn}
    for i in range(layers):
        expected |= {f"blk.{i}.{name}": tuple(sizes[d] for d in dims) for name, dims in _LAYER.items()}
    for name, shape in expected.items():
        if name not in tensors:
            raise fail(f"it has no tensor {name}, which its metadata describes ({layers:,} layers)")
        if _squeezed(tensors[name]) != _squeezed(shape):
            raise fail(f"its metadata describes {name} as {shape} but that tensor is {tensors[name]}")


#: The weights of each layer ``blk.N.``, by their shape (as GGUF writes it: the row length first).
_LAYER = {
    "attn_norm.weight": ("hidden",),
    "attn_q.weight": ("hidden", "q"),
    "attn_k.weight": ("hidden", "kv"),
    "attn_v.weight": ("hidden", "kv"),
    "attn_output.weight": ("q", "hidden"),
    "ffn_norm.weight": ("hidden",),
    "ffn_gate.weight": ("hidden", "ffn"),
    "ffn_up.weight": ("hidden", "ffn"),
    "ffn_down.weight": ("ffn", "hidden"),
}


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without trailing ones (a GGUF writer may keep them)."""
    end = len(shape)
    while end > 1 and shape[end - 1] == 1:
        end -= 1
    return shape[:end]
