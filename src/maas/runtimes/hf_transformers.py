"""Temporary: compression moves to maas.runtimes.hf; this old path re-exports from there until it has."""

from maas.runtimes.hf import (
    FORMAT,
    MARKER,
    HFEmbeddingRuntime,
    ModelDir,
    Tokenizer,
    encode,
    is_packed,
    pack,
    read_model_dir,
    unpack,
)

__all__ = [
    "FORMAT",
    "MARKER",
    "HFEmbeddingRuntime",
    "ModelDir",
    "Tokenizer",
    "encode",
    "is_packed",
    "pack",
    "read_model_dir",
    "unpack",
]
