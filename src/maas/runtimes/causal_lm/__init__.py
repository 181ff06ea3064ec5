"""Causal (generative) language models: the ``causal_lm`` format.

An artifact is either a GGUF file (``.gguf``, llama.cpp's format; a Llama-architecture model with a tokenizer and
a chat template), or a Hugging Face directory as ``save_pretrained`` writes it: ``config.json`` naming a
``*ForCausalLM`` architecture of model type ``llama``, ``mistral`` or ``qwen2``, ``tokenizer.json``, a chat
template (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``) and safetensors weights
(``model.safetensors``, or shards with ``model.safetensors.index.json``). The registry stores a directory packed
into one file (:func:`pack`), a GGUF file as it is. A GGUF file is converted to a Hugging Face directory the first
time it is loaded (transformers dequantises it, about 30 s for a 135M model) and kept in a cache under
``MAAS_HOME/cache/causal_lm/<its sha256>/``, checked on every load.

Nothing runs code: pickled weights and ``auto_map`` (custom code) are refused, transformers never gets
``trust_remote_code``, the chat template (untrusted text from the model file) renders in jinja2's sandbox.

The model takes ``text_input`` (BYTES ``[-1]``, UTF-8 prompts) and returns ``text_output`` (BYTES ``[-1]``): each
prompt completed greedily with up to :data:`MAX_OIP_TOKENS` new tokens. The OpenAI API serves chats and sampling
from the same runtime (``model``, ``tokenizer``, ``context_length``, ``eos_token_ids``).

One module per idea: :mod:`.gguf_header` (a GGUF header, bounded), :mod:`.gguf_model` (is it a model maas runs),
:mod:`.gguf_cache` (the conversion and its cache), :mod:`.model_dir` (checking a directory), :mod:`.archive` (a
directory as one file), :mod:`.chat_template`, :mod:`.tokenizer`, :mod:`.runtime` (the format and its runtime),
:mod:`.model` (the decoder, torch).

Public API:

- the format: ``FORMAT``, ``CausalLMFormat``, ``CausalLMRuntime``, ``MAX_OIP_TOKENS``, ``SIGNATURE``,
  ``hf_directory`` (the Hugging Face directory of any artifact form);
- text: ``ChatTokenizer``, ``ChatTemplate``;
- checks: ``read_causal_lm_dir``, ``CausalLMDir``, ``is_causal_lm_config``, ``check_gguf``, ``read_header``;
- storage: ``pack``, ``is_packed``, ``marker_format``, ``converted_dir``, ``gguf_digest``;
- the decoder: ``DecoderLM``.

Importing this package imports only the standard library and maas's core: every other name is imported on first
use, so ``import maas.runtimes`` (which detects these artifacts) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from maas.runtimes.causal_lm.archive import is_packed, marker_format, pack
from maas.runtimes.causal_lm.model_dir import CausalLMDir, is_causal_lm_config, read_causal_lm_dir

if TYPE_CHECKING:
    from maas.runtimes.causal_lm.chat_template import ChatTemplate
    from maas.runtimes.causal_lm.gguf_cache import converted_dir, gguf_digest
    from maas.runtimes.causal_lm.gguf_header import read_header
    from maas.runtimes.causal_lm.gguf_model import check_gguf
    from maas.runtimes.causal_lm.model import DecoderLM
    from maas.runtimes.causal_lm.runtime import (
        FORMAT,
        MAX_OIP_TOKENS,
        SIGNATURE,
        CausalLMFormat,
        CausalLMRuntime,
        hf_directory,
    )
    from maas.runtimes.causal_lm.tokenizer import ChatTokenizer

#: Public name -> the module that defines it, imported when the name is first used.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("FORMAT", "MAX_OIP_TOKENS", "SIGNATURE", "CausalLMFormat", "CausalLMRuntime", "hf_directory"),
        "maas.runtimes.causal_lm.runtime",
    ),
    "ChatTokenizer": "maas.runtimes.causal_lm.tokenizer",
    "ChatTemplate": "maas.runtimes.causal_lm.chat_template",
    "check_gguf": "maas.runtimes.causal_lm.gguf_model",
    "read_header": "maas.runtimes.causal_lm.gguf_header",
    **dict.fromkeys(("converted_dir", "gguf_digest"), "maas.runtimes.causal_lm.gguf_cache"),
    "DecoderLM": "maas.runtimes.causal_lm.model",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "FORMAT",
    "MAX_OIP_TOKENS",
    "SIGNATURE",
    "CausalLMDir",
    "CausalLMFormat",
    "CausalLMRuntime",
    "ChatTemplate",
    "ChatTokenizer",
    "DecoderLM",
    "check_gguf",
    "converted_dir",
    "gguf_digest",
    "hf_directory",
    "is_causal_lm_config",
    "is_packed",
    "marker_format",
    "pack",
    "read_causal_lm_dir",
    "read_header",
]
