"""Temporary: compression moves to maas.runtimes.hf; this old path re-exports from there until it has."""

from maas.runtimes.hf import HEADS_KEY, attention_blocks, load_model, pruned_heads, shrink_block

__all__ = ["HEADS_KEY", "attention_blocks", "load_model", "pruned_heads", "shrink_block"]
