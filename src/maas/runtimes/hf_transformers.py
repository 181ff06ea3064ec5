"""Hugging Face model directories served as sentence-embedding models: the ``hf_transformers`` format.

The artifact is a directory as ``save_pretrained`` writes it: ``config.json``, ``tokenizer.json``, and
either safetensors weights (``model.safetensors``, or shards with ``model.safetensors.index.json``), run
by ``transformers``, or a ``model.onnx`` holding the whole embedding graph (pooling included, as
:func:`maas.runtimes.hf_export.export_onnx` writes it), run by onnxruntime. The registry stores the
directory packed by :func:`pack` into one uncompressed zip; :func:`unpack` turns that file back into a
directory (a cache under ``MAAS_HOME``). Every function here takes either form.

The model takes ``text`` (BYTES ``[-1]``, UTF-8) and returns ``embedding`` (FP32 ``[-1, hidden]``):
the pooling that ``1_Pooling/config.json`` names (mean over the attention mask by default), L2-normalised
when ``modules.json`` lists a ``Normalize`` module (or when there is no ``modules.json``).

Nothing in the directory runs: pickled weights are refused, a ``config.json`` with ``auto_map`` (custom
code) is refused, and ``transformers`` loads with ``trust_remote_code=False`` and safetensors only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from tokenizers import Encoding
from tokenizers import Tokenizer as _RustTokenizer

from maas.errors import InvalidInput
from maas.runtimes.base import brief, select_outputs
from maas.runtimes.hf_archive import MARKER, check_links, is_packed, pack, unpack
from maas.tensors import Signature, TensorSpec

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
#: Weight files maas never loads: they are pickles, and unpickling runs code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Feed names of the transformer (and of the exported ONNX graph), in this order.
FEED_NAMES = ("input_ids", "attention_mask", "token_type_ids")
#: sentence-transformers modules this runtime implements; any other (Dense, …) is refused.
_MODULES = ("Transformer", "Pooling", "Normalize")
_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
#: Texts per forward pass: bounds activation memory for large requests.
_CHUNK = 32
#: Characters added to the first cut of a long text, and how many times longer the last cut may be.
_CUT_SLACK, _MAX_GROWTH = 256, 16

Pooling = Literal["mean", "cls", "max"]


def _json(path: Path, shown: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; errors name it as ``shown`` (its name by default), never by server path."""
    shown = shown or path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"{shown} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"{shown} is not readable JSON: {brief(exc)}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{shown} must hold a JSON object, not {type(data).__name__}")
    return data


def _inside(root: Path, rel: object) -> bool:
    """True when ``rel`` (a path named inside a config) is a plain relative path that stays in ``root``."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or rel.startswith("/"):
        return False
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return False
    return (root / rel).resolve().is_relative_to(root.resolve())


@dataclass(frozen=True)
class ModelDir:
    """What the directory says about how to run it; :func:`read_model_dir` checks it."""

    root: Path
    #: ``onnx`` (``model.onnx``, preferred when present) or ``safetensors``.
    weights: Literal["onnx", "safetensors"]
    hidden_size: int
    #: Longest token sequence; longer texts are truncated (``max_seq_length`` of sentence-transformers).
    max_length: int
    pooling: Pooling
    normalize: bool
    #: Lower-case texts before tokenizing (sentence-transformers' ``do_lower_case``).
    lowercase: bool


def read_model_dir(root: Path) -> ModelDir:
    """Check a Hugging Face directory (see the module docstring) and read how to run it.

    Messages name the directory by its last part only: they reach clients, which must not learn server paths.
    """
    shown = root.name or "the model directory"
    if not root.is_dir():
        raise InvalidInput(f"{shown} is not a directory; give a Hugging Face model directory holding config.json")
    check_links(root)  # before reading anything: no file outside the directory is ever read
    if not (root / "config.json").is_file():
        raise InvalidInput(f"{shown} has no config.json; give a directory written by save_pretrained")
    config = _json(root / "config.json")
    if "auto_map" in config:
        raise InvalidInput(
            f"{shown}/config.json has 'auto_map': the model needs custom code from the directory, which maas never "
            "runs; use a model whose architecture ships with transformers"
        )
    if not (root / "tokenizer.json").is_file():
        raise InvalidInput(
            f"{shown} has no tokenizer.json (a fast tokenizer); write one with "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir) and register again"
        )
    weights = _weights(root)
    st_config = _json(root / "sentence_bert_config.json") if (root / "sentence_bert_config.json").is_file() else {}
    pooling, normalize, dimension = _modules(root)
    hidden = dimension or next((config[k] for k in ("hidden_size", "d_model", "dim") if k in config), None)
    if not isinstance(hidden, int) or hidden <= 0:
        raise InvalidInput(f"{shown}/config.json names no hidden size (hidden_size, d_model or dim)")
    return ModelDir(
        root=root,
        weights=weights,
        hidden_size=hidden,
        max_length=_max_length(root, config, st_config),
        pooling=pooling,
        normalize=normalize,
        lowercase=bool(st_config.get("do_lower_case", False)),
    )


def _weights(root: Path) -> Literal["onnx", "safetensors"]:
    shown = root.name or "the model directory"
    if (root / ONNX_FILE).is_file():
        return "onnx"
    if (root / SAFETENSORS_FILE).is_file():
        return "safetensors"
    if (root / SAFETENSORS_INDEX).is_file():
        shards = _json(root / SAFETENSORS_INDEX).get("weight_map", {})
        names = list(shards.values()) if isinstance(shards, dict) else []
        bad = sorted(
            {
                str(n)[:100]
                for n in names
                if not isinstance(n, str)
                or "/" in n
                or not n.endswith(".safetensors")
                or not _inside(root, n)
                or not (root / n).is_file()
            }
        )
        if not names or bad:
            raise InvalidInput(
                f"{shown}/{SAFETENSORS_INDEX} lists missing or invalid shards: {bad or 'none listed'}; every shard "
                "must be a .safetensors file inside the model directory"
            )
        return "safetensors"
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidInput(
            f"{shown} holds only pickled weights ({', '.join(pickles)}); maas never loads pickles because unpickling "
            "runs code. Convert them where you trust the file: AutoModel.from_pretrained(dir).save_pretrained(out, "
            "safe_serialization=True), then register out"
        )
    raise InvalidInput(f"{shown} has no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {ONNX_FILE}")


def _modules(root: Path) -> tuple[Pooling, bool, int | None]:
    """(pooling, normalize, embedding dimension) from modules.json and the pooling config."""
    shown = root.name or "the model directory"
    if not (root / "modules.json").is_file():
        return "mean", True, None
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
        entries = [(str(m["type"]).rsplit(".", 1)[-1], m.get("path", "")) for m in modules]
    except OSError as exc:
        raise InvalidInput(f"{shown}/modules.json cannot be read ({exc.strerror or type(exc).__name__})") from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise InvalidInput(f"{shown}/modules.json is not a sentence-transformers module list: {brief(exc)}") from None
    unknown = [kind for kind, _ in entries if kind not in _MODULES]
    if unknown:
        raise InvalidInput(
            f"{shown}/modules.json lists {', '.join(unknown)}; maas runs {', '.join(_MODULES)} modules only"
        )
    escaping = [str(p)[:100] for _, p in entries if p != "" and not _inside(root, p)]
    if escaping:
        raise InvalidInput(
            f"{shown}/modules.json names module paths {escaping!r} that are not folders inside the model directory; "
            "give each module a relative path such as 1_Pooling"
        )
    pooling: Pooling = "mean"
    dimension = None
    pool_dir = next((str(p) for kind, p in entries if kind == "Pooling"), None)
    if pool_dir is not None and (root / pool_dir / "config.json").is_file():
        pool = _json(root / pool_dir / "config.json", f"{pool_dir}/config.json")
        modes = [mode for key, mode in _POOLINGS.items() if pool.get(key)]
        others = [k for k, v in pool.items() if k.startswith("pooling_mode_") and v and k not in _POOLINGS]
        if len(modes) != 1 or others:
            raise InvalidInput(
                f"{shown}/{pool_dir}/config.json enables {', '.join(modes + others) or 'no pooling mode'}; "
                "maas runs exactly one of mean, cls or max pooling"
            )
        pooling = modes[0]  # type: ignore[assignment]
        dimension = pool.get("word_embedding_dimension")
    return pooling, any(kind == "Normalize" for kind, _ in entries), dimension


def _max_length(root: Path, config: Mapping[str, Any], st_config: Mapping[str, Any]) -> int:
    tok_config = _json(root / "tokenizer_config.json") if (root / "tokenizer_config.json").is_file() else {}
    # tokenizer_config uses a huge sentinel (1e30) for "no limit".
    limits = [st_config.get("max_seq_length"), tok_config.get("model_max_length")]
    sane = [v for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    if sane:
        return min(sane)
    positions = config.get("max_position_embeddings")
    return positions if isinstance(positions, int) and positions > 0 else 512


class Tokenizer:
    """Texts -> the feed the transformer (and the exported ONNX graph) takes.

    ``encode(texts)`` returns ``input_ids``, ``attention_mask`` and ``token_type_ids`` as int64
    ``[len(texts), longest]`` arrays: truncated to the model's ``max_seq_length``, padded to the longest
    text. The settings are fixed here once and never changed afterwards, so threads may share one
    instance (the Rust tokenizer only refuses concurrent use while its settings change).

    A long text is cut before it is tokenized (tokenizing is linear in the text, in time and memory, and
    all but ``max_length`` tokens are thrown away): first to ``max_length`` times the longest vocabulary
    token, plus some slack, which holds more tokens than the model uses unless most of the text yields
    none (whitespace, accents). The cut is kept only when the tokens kept all come from words before the
    last word of the cut text, so the cut did not change them; else the text is cut four times longer,
    up to ``_MAX_GROWTH`` times the first cut, where the cut is kept whatever it holds.
    """

    def __init__(self, directory: Path) -> None:
        info = read_model_dir(unpack(Path(directory)))
        self.max_length = info.max_length
        self._lowercase = info.lowercase
        try:
            tok = _RustTokenizer.from_file(str(info.root / "tokenizer.json"))
        except Exception as exc:
            raise InvalidInput(f"tokenizer.json is not a tokenizers file: {brief(exc)}") from None
        # tokenizer.json often carries fixed-length padding and another truncation length (MiniLM: 128).
        tok.enable_truncation(max_length=info.max_length)
        tok.no_padding()  # encode() pads, to the longest text
        self._pad_id = tok.token_to_id(_pad_token(info.root, tok)) or 0
        longest = max((len(t) for t in tok.get_vocab()), default=1)
        self._cut = info.max_length * max(longest, 1) + _CUT_SLACK
        self._tok = tok

    def _encode(self, texts: Sequence[str]) -> list[Encoding]:
        limits = [self._cut] * len(texts)
        out: list[Encoding] = [None] * len(texts)  # type: ignore[list-item]
        todo = list(range(len(texts)))
        while todo:
            pieces = [texts[i][: limits[i]] for i in todo]
            if self._lowercase:  # after the cut: lower() of the whole text would copy all of it
                pieces = [p.lower() for p in pieces]
            for i, encoding in zip(todo, self._tok.encode_batch(pieces), strict=True):
                out[i] = encoding
            todo = [
                i
                for i in todo
                if len(texts[i]) > limits[i] and limits[i] < self._cut * _MAX_GROWTH and not _cut_is_unseen(out[i])
            ]
            for i in todo:
                limits[i] *= 4
        return out

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self._encode(texts)
        width = max((len(e.ids) for e in encodings), default=0)

        def column(rows: list[list[int]], pad: int) -> np.ndarray:
            array = np.full((len(rows), width), pad, dtype=np.int64)
            for row, values in zip(array, rows, strict=True):
                row[: len(values)] = values
            return array

        return {
            "input_ids": column([e.ids for e in encodings], self._pad_id),
            "attention_mask": column([e.attention_mask for e in encodings], 0),
            "token_type_ids": column([e.type_ids for e in encodings], 0),
        }


def _cut_is_unseen(encoding: Encoding) -> bool:
    """True when every kept token of a cut text's encoding comes from a word before the cut text's last word
    (the one the cut may have split), so the whole text starts with the same tokens."""
    if not encoding.overflowing:
        return False  # all of the cut text fits: the rest of the text might have added tokens
    kept = [w for w in encoding.word_ids if w is not None]
    rest = [w for o in encoding.overflowing for w in o.word_ids if w is not None]
    return bool(kept) and bool(rest) and max(kept) < max(rest)


def _pad_token(root: Path, tok: _RustTokenizer) -> str:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (root / name).is_file():
            value = _json(root / name).get("pad_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and tok.token_to_id(value) is not None:
                return value
    return next((t for t in ("[PAD]", "<pad>") if tok.token_to_id(t) is not None), "[PAD]")


def encode(directory: Path, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Tokenize ``texts`` as the model in ``directory`` (or its packed zip) does: the ONNX feed of
    :class:`Tokenizer`. Builds a tokenizer per call; keep a :class:`Tokenizer` for repeated use."""
    return Tokenizer(directory).encode(texts)


class _Backend(Protocol):
    """Runs the feed through the model and pooling: ``[n, seq]`` int64 arrays -> ``[n, hidden]`` float32."""

    def __call__(self, feed: Mapping[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...


class HFEmbeddingRuntime:
    """A loaded embedding model: tokenizer plus a torch or onnxruntime backend, both safe to share."""

    def __init__(self, info: ModelDir, tokenizer: Tokenizer, backend: _Backend, device: str) -> None:
        self.signature = _signature(info.hidden_size)
        self.device = device
        self.tokenizer = tokenizer
        self._hidden = info.hidden_size
        self._backend: _Backend | None = backend

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        backend = self._backend
        if backend is None:
            raise RuntimeError("this hf_transformers runtime was closed; load the model again")
        names = select_outputs(self.signature, outputs)
        if "text" not in inputs:
            raise InvalidInput("missing input 'text'; the model takes text (BYTES [-1], one UTF-8 text per row)")
        texts = _texts(np.asarray(inputs["text"]))
        result = np.zeros((len(texts), self._hidden), dtype=np.float32)
        # Similar lengths per chunk keep padding (wasted compute) small; the order is restored below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), _CHUNK):
            rows = order[start : start + _CHUNK]
            result[rows] = backend(self.tokenizer.encode([texts[i] for i in rows]))
        return {name: result for name in names}

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend = None


def _texts(array: np.ndarray) -> list[str]:
    if array.ndim != 1:
        raise InvalidInput(f"input 'text' has shape {list(array.shape)}; expected [-1], one text per row")
    texts = []
    for i, value in enumerate(array.tolist()):
        if isinstance(value, str):
            texts.append(value)
            continue
        if not isinstance(value, bytes | bytearray):
            raise InvalidInput(f"input 'text' row {i} is {type(value).__name__}; send BYTES (UTF-8 text)")
        try:
            texts.append(bytes(value).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input 'text' row {i} is not UTF-8 ({exc}); encode texts as UTF-8") from None
    return texts


def _signature(hidden: int) -> Signature:
    return Signature(
        inputs=(TensorSpec("text", "BYTES", (-1,)),),
        outputs=(TensorSpec("embedding", "FP32", (-1, hidden)),),
    )


class _OnnxBackend:
    def __init__(self, path: Path, device: str) -> None:
        from maas.runtimes.onnx import FORMAT as ONNX

        self.runtime = ONNX.load(path, device=device)
        self.feeds = [s.name for s in self.runtime.signature.inputs]

    def __call__(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        out = self.runtime.infer({name: feed[name] for name in self.feeds}, ["embedding"])["embedding"]
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.runtime.close()


def _check_onnx(info: ModelDir) -> int:
    """The embedding width of ``model.onnx`` after checking it is an embedding graph maas can feed."""
    from maas.runtimes.onnx import FORMAT as ONNX

    path = info.root / ONNX_FILE
    sig = ONNX.inspect(path)
    extra = [s.name for s in sig.inputs if s.name not in FEED_NAMES]
    out = sig.output("embedding")
    if extra or out is None or len(out.shape) != 2 or out.datatype != "FP32":
        raise InvalidInput(
            f"{ONNX_FILE} takes {', '.join(s.name for s in sig.inputs)} and returns "
            f"{', '.join(s.describe() for s in sig.outputs)}; maas serves ONNX graphs that take "
            f"{', '.join(FEED_NAMES)} and return embedding FP32 [-1, hidden]: write one with "
            "maas.runtimes.hf_export.export_onnx"
        )
    return out.shape[1] if out.shape[1] > 0 else info.hidden_size


class HFTransformersFormat:
    """The ``hf_transformers`` format: a Hugging Face directory, or one packed by :func:`pack`."""

    name = "hf_transformers"
    suffixes: tuple[str, ...] = ()

    def inspect(self, path: Path) -> Signature:
        info = read_model_dir(unpack(path))
        Tokenizer(info.root)  # a tokenizer.json that does not load is an invalid artifact
        return _signature(_check_onnx(info) if info.weights == "onnx" else info.hidden_size)

    def load(self, path: Path, *, device: str = "cpu") -> HFEmbeddingRuntime:
        info = read_model_dir(unpack(path))
        tokenizer = Tokenizer(info.root)
        backend: _Backend
        if info.weights == "onnx":
            hidden = _check_onnx(info)
            info = replace(info, hidden_size=hidden)
            backend = _OnnxBackend(info.root / ONNX_FILE, device)
            used = backend.runtime.device
        else:
            from maas.runtimes.hf_export import TorchBackend

            torch_backend = TorchBackend(info, device)
            backend, used = torch_backend, torch_backend.device
        log.info("loaded %s (%s weights, %s pooling) on %s", path.name, info.weights, info.pooling, used)
        return HFEmbeddingRuntime(info, tokenizer, backend, used)

    def pack(self, directory: Path, dest: Path) -> Path:
        """Write ``directory`` as the single file the registry stores (see :func:`maas.runtimes.hf_archive.pack`)."""
        read_model_dir(directory)
        return pack(directory, dest)


FORMAT = HFTransformersFormat()

__all__ = [
    "FORMAT",
    "MARKER",
    "HFEmbeddingRuntime",
    "ModelDir",
    "Tokenizer",
    "encode",
    "is_packed",
    "pack",
    "read_model_dir",
    "unpack",
]
