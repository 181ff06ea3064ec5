"""ONNX graph preparation before ONNX Runtime quantizes it, and the check that it did.

``Gemm`` with a constant weight becomes ``MatMul`` + ``Add`` (ORT's dynamic quantizer skips ``Gemm``);
attention blocks are fused into ORT's ``MultiHeadAttention`` (:mod:`~maas.compression.steps.quantize.attention_fusion`)
when the fused model's outputs match; ORT's ``quant_pre_process`` folds constants and infers shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maas.compression.steps.quantize.attention_fusion import fuse_attention
from maas.errors import InvalidInput

log = logging.getLogger(__name__)

#: Ops that only a quantized model holds.
_QUANTIZED_OPS = (
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "QAttention",
    "QEmbedLayerNormalization",
    "DynamicQuantizeLSTM",
    "ConvInteger",
    "QLinearMatMul",
    "QGemm",
)


def gemm_to_matmul(src: Path, dest: Path) -> Path:
    """``Gemm(A, B, C)`` with a constant ``B`` (alpha = beta = 1, A not transposed) as ``MatMul`` + ``Add``, which
    dynamic quantization handles; ``src`` itself when there is no such Gemm."""
    model = onnx.load(str(src))
    inits = {init.name: init for init in model.graph.initializer}
    nodes, changed = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or node.input[1] not in inits
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        b_name = node.input[1]
        if attrs.get("transB", 0):
            b_name = f"{node.input[1]}_t_{changed}"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), b_name))
        has_c = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_matmul" if has_c else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [mm_out], name=f"{node.name}_matmul"))
        if has_c:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_add"))
        changed += 1
    if not changed:
        return src
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    onnx.save(model, str(dest))
    return dest


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def fuse(src: Path, dest: Path, feed: Callable[[], dict[str, np.ndarray]]) -> tuple[Path, int]:
    """``src`` with its attention blocks fused (:mod:`~maas.compression.steps.quantize.attention_fusion`), kept
    only when its outputs on ``feed()`` match the original's; (path, blocks fused)."""
    import onnxruntime as ort

    model = onnx.load(str(src))
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    fused = fuse_attention(model)
    if not fused:
        return src, 0
    onnx.save(model, str(dest))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    inputs = feed()
    try:
        before = ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"]).run(None, inputs)
        after = ort.InferenceSession(str(dest), options, providers=["CPUExecutionProvider"]).run(None, inputs)
    except Exception as exc:
        log.warning("attention fusion made a model onnxruntime cannot run (%s); quantizing without it", exc)
        return src, 0
    for a, b in zip(before, after, strict=True):
        if np.asarray(a).dtype.kind == "f" and not np.allclose(a, b, rtol=1e-3, atol=1e-4):
            log.warning(
                "attention fusion changed the outputs (max diff %g); quantizing without it", np.abs(a - b).max()
            )
            return src, 0
    return dest, fused


def pre_process(src: Path, dest: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        # Symbolic shape inference is skipped: it fails on torch.export graphs and leaves files in the cwd.
        quant_pre_process(str(src), str(dest), skip_symbolic_shape=True)
    except Exception as exc:
        log.info("quant_pre_process failed on %s (%s); quantizing it as it is", src.name, exc)
        return src
    return dest


def check_quantized(path: Path, mode: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    if not any(node.op_type in _QUANTIZED_OPS for node in model.graph.node):
        raise InvalidInput(
            f"onnxruntime {mode} quantization found nothing to quantize in the model (no MatMul, Gemm, Gather or Conv "
            "with constant weights of the op types asked for); check op_types, or quantize a model with linear layers"
        )
