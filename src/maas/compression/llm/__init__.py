"""Compressing causal language models (the ``causal_lm`` format): int8 weight-only or bfloat16, measured honestly.

:mod:`.plan` checks what a recipe asks (one ``quantize`` step, ``backend: torchao``, ``mode: weight_only`` or
``bfloat16``); :mod:`.quantize` rewrites the parent's weights (the int8 layout is
:mod:`maas.runtimes.causal_lm.quantized`'s, which also loads it); :mod:`.measure` times decoding and compares
quality (:mod:`.texts` is the fixed evaluation set); :mod:`.report` holds the numbers; :mod:`.run` ties them together
and registers the child. :func:`maas.compression.pipeline.compress` sends a ``causal_lm`` parent here.
"""
