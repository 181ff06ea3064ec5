"""Temporary: compression moves to maas.runtimes.hf; this old path re-exports from there until it has."""

from maas.runtimes.hf import MIN_COSINE, SentenceEmbedder, export_onnx, load_embedder

__all__ = ["MIN_COSINE", "SentenceEmbedder", "export_onnx", "load_embedder"]
