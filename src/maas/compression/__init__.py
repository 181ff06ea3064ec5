"""Compression: prune, quantize and distill registered models into smaller, measured, registered versions.

``compress(source_uri, recipe, name)`` is the entry point (:mod:`maas.compression.pipeline`); each step
type is one module (``prune``, ``quantize``, ``distill``, ``export``); ``report`` measures parent and child.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compress", "load_recipe", "parse_recipe"]


def __getattr__(name: str) -> Any:  # lazy: importing maas.compression must not import torch
    if name == "compress":
        from maas.compression.pipeline import compress

        return compress
    if name in ("load_recipe", "parse_recipe"):
        from maas.compression import recipe

        return getattr(recipe, name)
    raise AttributeError(name)
