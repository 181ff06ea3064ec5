"""ONNX Runtime int8 for the ``quantize`` step: ``dynamic`` and ``static`` (QDQ, calibrated).

``dynamic`` stores weights as int8 (per output channel when ``per_channel``) and quantizes activations at
run time (uint8, per tensor): ``MatMul`` (and ``Gemm``, rewritten to ``MatMul`` first, since ORT's dynamic
quantizer skips it), ``Gather`` over a weight table (a transformer's word embeddings: most of a small
encoder's file), and ORT's fused ``Attention``/``EmbedLayerNormalization``/``LSTM``. ``Conv`` is left out
unless ``op_types`` names it, because ``ConvInteger`` has no fast kernel on the CPU. Weights are signed and
activations unsigned (U8S8), the fast pair on x86; on x86 CPUs without VNNI the weights use 7 bits
(``reduce_range``, which the recipe can also force on or off) so the 16-bit accumulation of ``vpmaddubsw``
cannot saturate. On all-MiniLM-L6-v2, 7-bit weights measured a mean cosine of 0.9907 to fp32 over
``sentences(200)`` against 0.9918 with 8 bits.

``static`` inserts QuantizeLinear/DequantizeLinear pairs (the QDQ format, which ORT fuses into integer
kernels) with per-channel weights and activation ranges calibrated (MinMax) on the first
``calibration_samples`` examples of ``step.calibration``; texts are tokenized as the model's
``hf_transformers`` runtime tokenizes them.

Both first run ORT's ``quant_pre_process`` (constant folding and shape inference, so the quantizer knows
every tensor's type); a model it cannot pre-process is quantized as it is. The graph preparation is in
:mod:`~maas.compression.steps.quantize.ort_graph`, the feeds in :mod:`~maas.compression.steps.quantize.ort_feeds`.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path
from typing import Any

import onnx

from maas.compression import formats
from maas.compression.candidate import Candidate, StepContext, copy_dir, hf_onnx_file, to_onnx
from maas.compression.recipe import QuantizeStep
from maas.compression.steps.quantize.backend import Runner
from maas.compression.steps.quantize.ort_feeds import Feeds, calibration_feeds, example_feed, model_file
from maas.compression.steps.quantize.ort_graph import check_quantized, fuse, gemm_to_matmul, pre_process
from maas.errors import InvalidInput

ONNX_FILE = "model.onnx"
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather", "Attention", "EmbedLayerNormalization", "LSTM")


def modes(step: QuantizeStep) -> list[str]:
    return ["dynamic", "static"] if step.calibration is not None else ["dynamic"]


def reduce_range(step: QuantizeStep) -> bool:
    """Whether the weights use 7 bits: as the recipe says, else on x86 CPUs without VNNI."""
    return _reduce_range() if step.reduce_range is None else step.reduce_range


def describe(step: QuantizeStep, mode: str) -> str:
    weights = ("per-channel" if step.per_channel else "per-tensor") + (" 7-bit" if reduce_range(step) else "")
    if mode == "static":
        samples = step.calibration_samples
        return f"quantize onnxruntime static int8 QDQ ({weights}, MinMax calibration on {samples} samples)"
    return f"quantize onnxruntime dynamic int8 ({weights})"


def prepare(cand: Candidate, ctx: StepContext) -> Candidate:
    """An ONNX file, or a Hugging Face directory holding ``model.onnx`` (safetensors ones are exported first)."""
    if cand.kind == "hf":
        return cand if hf_onnx_file(cand) is not None else to_onnx(cand, ctx)
    return to_onnx(cand, ctx)


def quantize(step: QuantizeStep, mode: str, cand: Candidate, ctx: StepContext) -> Candidate:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    src = model_file(cand)
    out = ctx.subdir(f"quantize-{mode}")
    if cand.kind == "hf":
        assert cand.path is not None
        copy_dir(cand.path, out, skip=lambda rel: rel.as_posix() == ONNX_FILE)
    dest = out / ONNX_FILE
    scratch = ctx.subdir(f"quantize-{mode}-prep")
    ops = list(step.op_types or (DYNAMIC_OPS if mode == "dynamic" else ()))
    if mode == "dynamic" and "Gemm" in ops:
        src = gemm_to_matmul(src, scratch / "matmul.onnx")
        ops = list(dict.fromkeys("MatMul" if op == "Gemm" else op for op in ops))
    src, fused = fuse(src, scratch / "fused.onnx", lambda: example_feed(cand, ctx, 4))
    src = pre_process(src, scratch / "pre.onnx")
    # When shape inference cannot type a tensor (outputs of contrib ops), it is a float: what ORT's own
    # transformer optimizer produces around Attention and friends.
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    seven_bit = reduce_range(step)
    try:
        if mode == "dynamic":
            quantize_dynamic(
                src,
                dest,
                op_types_to_quantize=ops,
                per_channel=step.per_channel,
                reduce_range=seven_bit,
                weight_type=QuantType.QInt8,
                extra_options=extra,
            )
        elif mode == "static":
            reader = Feeds(calibration_feeds(step, cand, ctx))
            quantize_static(
                src,
                dest,
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=ops or None,
                per_channel=step.per_channel,
                reduce_range=seven_bit,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options=extra,
            )
        else:
            raise InvalidInput(f"onnxruntime has no quantization mode {mode!r}; use dynamic or static")
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(
            f"onnxruntime could not quantize {src.name} ({mode}): {type(exc).__name__}: {exc}. "
            + (
                "Try mode dynamic, or limit op_types (e.g. [MatMul])"
                if mode == "static"
                else "Limit op_types (e.g. [MatMul]), or export the model again with a recent opset"
            )
        ) from exc
    check_quantized(dest, mode)
    child = (
        cand.evolve(path=out, format="hf_transformers")
        if cand.kind == "hf"
        else cand.evolve(kind="onnx", path=dest, module=None, format="onnx")
    )
    if seven_bit:
        child.notes.append(
            "int8 weights use 7 bits (reduce_range"
            + (", chosen because this CPU has no VNNI" if step.reduce_range is None else "")
            + "): no saturation in the 16-bit accumulation of x86 CPUs without VNNI, at a small cost in accuracy; "
            "`reduce_range: false` keeps 8 bits"
        )
    if fused:
        child.notes.append(
            f"int8 {mode}: fused {fused} attention blocks into onnxruntime's MultiHeadAttention before quantizing "
            "(part of the speed-up is this fusion, not int8)"
        )
    return child


def runner(cand: Candidate, ctx: StepContext, rows: int) -> Runner:
    """The candidate's ONNX graph in the ``onnx`` runtime (the sessions maas serves with), on ``rows`` rows:
    the example inputs repeated, texts tokenized first (tokenizing is left out of the timing)."""
    runtime = formats.onnx_runtime(model_file(cand))
    feed = example_feed(cand, ctx, rows)
    names = [s.name for s in runtime.signature.outputs]
    return lambda: [runtime.infer(feed)[n] for n in names]


@cache
def _reduce_range() -> bool:
    """7-bit weights on x86 CPUs without VNNI (see the module docstring)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))
