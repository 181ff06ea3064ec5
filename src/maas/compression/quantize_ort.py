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
every tensor's type); a model it cannot pre-process is quantized as it is.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maas.compression.candidate import Candidate, StepContext, copy_dir, hf_onnx_file, to_onnx
from maas.compression.quantize import Runner
from maas.compression.recipe import QuantizeStep
from maas.errors import InvalidInput
from maas.tensors import Signature, numpy_dtype
from maas.imports import resolve

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather", "Attention", "EmbedLayerNormalization", "LSTM")
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
#: Rows per calibration call (models with a fixed batch dimension get one row per call).
CALIBRATION_BATCH = 32


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


def model_file(cand: Candidate) -> Path:
    path = hf_onnx_file(cand) if cand.kind == "hf" else cand.path
    assert path is not None
    return path


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
        src = _gemm_to_matmul(src, scratch / "matmul.onnx")
        ops = list(dict.fromkeys("MatMul" if op == "Gemm" else op for op in ops))
    src, fused = _fuse(src, scratch / "fused.onnx", lambda: _feed(cand, ctx, 4))
    src = _pre_process(src, scratch / "pre.onnx")
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
            reader = _Feeds(calibration_feeds(step, cand, ctx))
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
    _check_quantized(dest, mode)
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
    from maas.runtimes.onnx import FORMAT as ONNX

    runtime = ONNX.load(model_file(cand))
    feed = _feed(cand, ctx, rows)
    names = [s.name for s in runtime.signature.outputs]
    return lambda: [runtime.infer(feed)[n] for n in names]


def _feed(cand: Candidate, ctx: StepContext, rows: int) -> dict[str, np.ndarray]:
    """The ONNX graph's inputs for ``rows`` rows: the example inputs repeated, texts tokenized."""
    from maas.runtimes.onnx import FORMAT as ONNX

    signature = ONNX.inspect(model_file(cand))
    if cand.kind == "hf":
        texts = _texts(list(ctx.example_inputs["text"]))
        return _tokenize(cand, [texts[i % len(texts)] for i in range(rows)], signature)
    missing = [s.name for s in signature.inputs if s.name not in ctx.example_inputs]
    if missing:
        raise InvalidInput(f"the example inputs lack {', '.join(missing)}, which the ONNX model takes")
    return {s.name: _repeat(ctx.example_inputs[s.name], rows) for s in signature.inputs}


# --- calibration ---------------------------------------------------------------------------------


class _Feeds:
    """A CalibrationDataReader over prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibration_feeds(step: QuantizeStep, cand: Candidate, ctx: StepContext) -> list[dict[str, np.ndarray]]:
    """The inputs of the first ``calibration_samples`` examples of ``step.calibration``, as ONNX feeds."""
    from maas.runtimes.onnx import FORMAT as ONNX

    spec = step.calibration
    if spec is None:
        raise InvalidInput("mode 'static' needs calibration: {dataset: package.module:function}")
    data = resolve(spec.dataset, "calibration.dataset")(**spec.kwargs)
    try:
        n = min(len(data), step.calibration_samples)
    except TypeError:
        raise InvalidInput(
            f"calibration.dataset {spec.dataset!r} returned a {type(data).__name__}, which has no length; return a "
            "list of texts or a map-style dataset of inputs or (input, label) pairs"
        ) from None
    if n == 0:
        raise InvalidInput(f"calibration.dataset {spec.dataset!r} is empty")
    items = [data[i] for i in range(n)]
    signature = ONNX.inspect(model_file(cand))
    if cand.kind == "hf":
        texts = _texts([item[0] if isinstance(item, tuple | list) else item for item in items])
        return [_tokenize(cand, texts[i : i + CALIBRATION_BATCH], signature) for i in range(0, n, CALIBRATION_BATCH)]
    columns = _columns(items, signature, spec.dataset)
    dynamic = all(s.shape and s.shape[0] == -1 for s in signature.inputs)
    size = CALIBRATION_BATCH if dynamic else 1
    return [{name: col[i : i + size] for name, col in columns.items()} for i in range(0, n, size)]


def _columns(items: Sequence[Any], signature: Signature, dataset: str) -> dict[str, np.ndarray]:
    n_in = len(signature.inputs)
    rows = [tuple(item) if isinstance(item, tuple | list) else (item,) for item in items]
    if len(rows[0]) not in (n_in, n_in + 1):
        raise InvalidInput(
            f"calibration.dataset {dataset!r} items have {len(rows[0])} parts; the model takes {n_in} input(s) "
            f"({', '.join(s.name for s in signature.inputs)}), so items must be the inputs, optionally with a label"
        )
    columns = {}
    for i, spec in enumerate(signature.inputs):
        values = [np.asarray(r[i].detach().cpu() if hasattr(r[i], "detach") else r[i]) for r in rows]
        columns[spec.name] = np.stack(values).astype(numpy_dtype(spec.datatype), copy=False)
    return columns


def _texts(values: Sequence[Any]) -> list[str]:
    texts = []
    for v in values:
        if isinstance(v, bytes | bytearray):
            texts.append(bytes(v).decode("utf-8"))
        elif isinstance(v, str):
            texts.append(v)
        else:
            raise InvalidInput(f"a text model needs texts (str) for calibration and timing, got {type(v).__name__}")
    return texts


def _tokenize(cand: Candidate, texts: list[str], signature: Signature) -> dict[str, np.ndarray]:
    from maas.runtimes.hf_transformers import Tokenizer

    assert cand.path is not None
    feed = Tokenizer(cand.path).encode(texts)
    return {s.name: feed[s.name] for s in signature.inputs}


def _repeat(array: np.ndarray, rows: int) -> np.ndarray:
    return np.take(np.asarray(array), np.arange(rows) % len(array), axis=0)


# --- graph preparation -----------------------------------------------------------------------------


def _gemm_to_matmul(src: Path, dest: Path) -> Path:
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


def _fuse(src: Path, dest: Path, feed: Callable[[], dict[str, np.ndarray]]) -> tuple[Path, int]:
    """``src`` with its attention blocks fused (:mod:`maas.compression.attention_fusion`), kept only when its
    outputs on ``feed()`` match the original's; (path, blocks fused)."""
    import onnxruntime as ort

    from maas.compression.attention_fusion import fuse_attention

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


def _pre_process(src: Path, dest: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        # Symbolic shape inference is skipped: it fails on torch.export graphs and leaves files in the cwd.
        quant_pre_process(str(src), str(dest), skip_symbolic_shape=True)
    except Exception as exc:
        log.info("quant_pre_process failed on %s (%s); quantizing it as it is", src.name, exc)
        return src
    return dest


def _check_quantized(path: Path, mode: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    if not any(node.op_type in _QUANTIZED_OPS for node in model.graph.node):
        raise InvalidInput(
            f"onnxruntime {mode} quantization found nothing to quantize in the model (no MatMul, Gemm, Gather or Conv "
            "with constant weights of the op types asked for); check op_types, or quantize a model with linear layers"
        )


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
