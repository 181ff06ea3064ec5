"""ONNX graphs as trainable ``torch.fx`` modules, so that pruning and distillation can work on ONNX models.

:func:`import_onnx` turns each ONNX node into the torch call that computes it (``Gemm`` into
``F.linear``, ``Conv`` into ``F.conv2d``, …). Float initializers become ``nn.Parameter``s registered
under their ONNX names (``model.0.weight`` stays ``model.0.weight``, so layer names survive an export
round trip); integer initializers and batch-norm statistics become buffers. Small integer constants
(shapes, axes, indices) are folded into the graph as Python values, and shape arithmetic (``Shape`` →
``Gather`` → ``Concat`` → ``Reshape``) runs on Python ints, so ``torch.export`` sees a dynamic batch as a
symbolic size rather than as data.

The modules, each importing only those listed before it: ``kernels`` (what the imported graphs call when
they run), ``builder`` (the state of one import), ``handlers`` (what every op handler shares),
``elementwise_ops``, ``layer_ops`` and ``shape_ops`` (one handler per ONNX op), ``importer`` (the walk over
the graph).
"""

from __future__ import annotations

from maas.compression.onnx_import.importer import import_onnx

__all__ = ["import_onnx"]
