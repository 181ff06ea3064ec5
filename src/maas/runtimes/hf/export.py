"""A safetensors ``hf_transformers`` directory exported to one with ``model.onnx``, checked against torch.

The whole :class:`~maas.runtimes.hf.embedder.SentenceEmbedder` (pooling and normalisation included) is
exported, so the ONNX path only tokenizes and runs the graph.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

from maas.errors import InvalidInput, MaasError
from maas.runtimes.export import quiet_onnx_exporter
from maas.runtimes.hf.archive import member_files, unpack
from maas.runtimes.hf.embedder import SentenceEmbedder, load_embedder
from maas.runtimes.hf.model_dir import ONNX_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, read_model_dir
from maas.runtimes.hf.tokenizer import Tokenizer

log = logging.getLogger(__name__)

#: Sentences the export is traced on and checked with (two lengths, so the trace sees padding).
_SAMPLES = (
    "maas serves this sentence.",
    "A second, somewhat longer sentence, so that the batch is padded and the mask matters.",
    "",
    "Ünïcödé, 東京, and an emoji 🙂.",
)
#: Least cosine similarity between the ONNX and torch embeddings that counts as the same model.
MIN_COSINE = 0.9999


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def _name_axes(graph: onnx.GraphProto) -> None:
    """Call the exporter's symbolic dimensions (``s18``, …) ``batch`` and ``sequence``."""
    first = graph.input[0].type.tensor_type.shape.dim
    names = {first[0].dim_param: "batch", first[1].dim_param: "sequence"}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def _export(module: SentenceEmbedder, feed: Mapping[str, np.ndarray], dest: Path, max_positions: int | None) -> None:
    args = tuple(torch.from_numpy(feed[n]) for n in module.feed_names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max_positions)
    # torch.export first, then the dynamo ONNX exporter on its program, as maas.runtimes.export does; this
    # handles BERT-family models (checked on MiniLM with transformers 5 and sdpa attention).
    exported = torch.export.export(module, args, dynamic_shapes=tuple({0: batch, 1: seq} for _ in args))
    with quiet_onnx_exporter():
        program = torch.onnx.export(
            exported,
            args,
            None,
            input_names=module.feed_names,
            output_names=["sentence_embedding"],
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise MaasError("torch.onnx.export returned no program")
    model = program.model_proto
    # The exporter names aten.embedding's output "embedding": clear the name before the output takes it.
    _rename_value(model.graph, "embedding", "token_embedding")
    _rename_value(model.graph, "sentence_embedding", "embedding")
    _name_axes(model.graph)
    if model.ByteSize() >= 2**31 - 1:
        raise InvalidInput("the model is over 2 GiB, too large for a single-file ONNX model; serve it with torch")
    onnx.save(model, str(dest))


def _check_export(module: SentenceEmbedder, feed: Mapping[str, np.ndarray], onnx_path: Path) -> float:
    """Least cosine similarity between the torch and ONNX embeddings of ``feed``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {n: feed[n] for n in module.feed_names})[0]
    with torch.inference_mode():
        want = module(*(torch.from_numpy(feed[n]) for n in module.feed_names)).numpy()
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    return float(np.min((got * want).sum(axis=1) / np.maximum(norms, 1e-12)))


def export_onnx(src_dir: Path, out_dir: Path) -> Path:
    """Export the safetensors model in ``src_dir`` (a directory or a packed file) to ``out_dir``.

    ``out_dir`` (absent or empty) becomes a complete ``hf_transformers`` directory: ``model.onnx``
    (one file, no external data; inputs ``input_ids``, ``attention_mask`` and ``token_type_ids`` when
    the model takes them, int64 ``[batch, sequence]``; output ``embedding`` FP32 ``[batch, hidden]``
    with pooling and normalisation inside), the config, tokenizer and pooling files, and no
    safetensors. The export is checked against torch (cosine similarity at least ``MIN_COSINE``) before
    ``out_dir`` appears; it is written in a temporary directory and renamed into place. Returns ``out_dir``.
    """
    info = read_model_dir(unpack(Path(src_dir)))
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidInput(f"{out_dir} already exists and is not an empty directory; choose a new output directory")
    module = load_embedder(info, "cpu")
    feed = Tokenizer(info.root).encode(list(_SAMPLES))
    config = getattr(module.model, "config", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        _export(module, feed, tmp / ONNX_FILE, max_positions if isinstance(max_positions, int) else None)
        cosine = _check_export(module, feed, tmp / ONNX_FILE)
        if cosine < MIN_COSINE:
            raise MaasError(
                f"the ONNX export of {info.root} disagrees with torch (cosine {cosine:.6f} < {MIN_COSINE}); "
                "serve the safetensors directory instead"
            )
        weights = {SAFETENSORS_FILE, SAFETENSORS_INDEX, ONNX_FILE}
        for name, source in member_files(info.root):
            if name in weights or name.endswith(".safetensors"):
                continue
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (ONNX vs torch cosine >= %.6f)", info.root, out_dir / ONNX_FILE, cosine)
    return out_dir
