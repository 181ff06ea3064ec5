"""Hugging Face model directories served as sentence-embedding models: the ``hf_transformers`` format.

The artifact is a directory as ``save_pretrained`` writes it: ``config.json``, ``tokenizer.json``, and
either safetensors weights (``model.safetensors``, or shards with ``model.safetensors.index.json``), run
by ``transformers``, or a ``model.onnx`` holding the whole embedding graph (pooling included, as
:func:`export_onnx` writes it), run by onnxruntime. The registry stores the directory packed by
:func:`pack` into one uncompressed zip; :func:`unpack` turns that file back into a directory (a cache
under ``MAAS_HOME``). Every function here takes either form.

The model takes ``text`` (BYTES ``[-1]``, UTF-8) and returns ``embedding`` (FP32 ``[-1, hidden]``):
the pooling that ``1_Pooling/config.json`` names (mean over the attention mask by default), L2-normalised
when ``modules.json`` lists a ``Normalize`` module (or when there is no ``modules.json``).

Nothing in the directory runs: pickled weights are refused, a ``config.json`` with ``auto_map`` (custom
code) is refused, and ``transformers`` loads with ``trust_remote_code=False`` and safetensors only.

One module per idea: :mod:`.archive` (a directory as one file, and back), :mod:`.model_dir` (reading and
checking the directory), :mod:`.tokenizer`, :mod:`.runtime` (the format and its runtime),
:mod:`.embedder` (the torch module), :mod:`.export` (to ONNX), :mod:`.heads` (heads-pruned encoders).

Public API:

- the format: ``FORMAT`` (what :func:`maas.runtimes.get_format` returns for ``hf_transformers``),
  ``HFTransformersFormat``, ``HFEmbeddingRuntime``;
- the directory: ``ModelDir``, ``read_model_dir``; the stored file: ``MARKER``, ``pack``, ``unpack``,
  ``is_packed``;
- tokenizing: ``Tokenizer``, ``encode``;
- torch: ``SentenceEmbedder``, ``load_embedder``; export: ``export_onnx``, ``MIN_COSINE``;
- heads-pruned encoders: ``HEADS_KEY``, ``attention_blocks``, ``shrink_block``, ``pruned_heads``,
  ``load_model``.

Importing this package imports only the standard library: every name outside the archive and the
directory check is imported on first use, so ``import maas.runtimes`` (which detects packed directories
by ``MARKER``) stays light, and torch is imported only by the torch names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from maas.runtimes.hf.archive import MARKER, is_packed, pack, unpack
from maas.runtimes.hf.model_dir import ModelDir, read_model_dir

if TYPE_CHECKING:
    from maas.runtimes.hf.embedder import SentenceEmbedder, load_embedder
    from maas.runtimes.hf.export import MIN_COSINE, export_onnx
    from maas.runtimes.hf.heads import HEADS_KEY, attention_blocks, load_model, pruned_heads, shrink_block
    from maas.runtimes.hf.runtime import FORMAT, HFEmbeddingRuntime, HFTransformersFormat
    from maas.runtimes.hf.tokenizer import Tokenizer, encode

#: Public name -> the module that defines it, imported when the name is first used.
_LAZY: dict[str, str] = {
    **dict.fromkeys(("FORMAT", "HFEmbeddingRuntime", "HFTransformersFormat"), "maas.runtimes.hf.runtime"),
    **dict.fromkeys(("Tokenizer", "encode"), "maas.runtimes.hf.tokenizer"),
    **dict.fromkeys(("SentenceEmbedder", "load_embedder"), "maas.runtimes.hf.embedder"),
    **dict.fromkeys(("MIN_COSINE", "export_onnx"), "maas.runtimes.hf.export"),
    **dict.fromkeys(
        ("HEADS_KEY", "attention_blocks", "load_model", "pruned_heads", "shrink_block"), "maas.runtimes.hf.heads"
    ),
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
    "HEADS_KEY",
    "MARKER",
    "MIN_COSINE",
    "HFEmbeddingRuntime",
    "HFTransformersFormat",
    "ModelDir",
    "SentenceEmbedder",
    "Tokenizer",
    "attention_blocks",
    "encode",
    "export_onnx",
    "is_packed",
    "load_embedder",
    "load_model",
    "pack",
    "pruned_heads",
    "read_model_dir",
    "shrink_block",
    "unpack",
]
