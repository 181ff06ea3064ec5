"""Compression: prune, quantize and distill registered models into smaller, measured, registered versions.

``compress(source_uri, recipe, name)`` is the entry point (:mod:`maas.compression.pipeline`). A recipe
(:mod:`~maas.compression.recipe`) is a list of steps; each step type lives under :mod:`~maas.compression.steps`
(``prune``, ``quantize``, ``distill``, ``export``), found by name. Between steps the model is a
:mod:`~maas.compression.candidate`; ONNX models become torch graphs through :mod:`~maas.compression.onnx_import`.
:mod:`~maas.compression.report` measures parent and child (numbers only; the CLI draws them), and
:mod:`~maas.compression.formats` is where compression reaches into :mod:`maas.runtimes`.
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
