"""Temporary: compression moves to maas.runtimes.hf; this old path re-exports from there until it has."""

from maas.runtimes.hf import MARKER, is_packed, pack, unpack

__all__ = ["MARKER", "is_packed", "pack", "unpack"]
