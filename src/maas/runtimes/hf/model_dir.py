"""Reading and checking a Hugging Face model directory: what it holds and how to run it.

:func:`read_model_dir` refuses a directory that would make anything in it run (custom code named by
``auto_map``, pickled weights, links leading out of it, module paths escaping it) and reads the rest:
which weights, the hidden size, the longest sequence, the pooling and normalisation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from maas.errors import InvalidInput
from maas.runtimes.base import brief
from maas.runtimes.hf.archive import check_links
from maas.runtimes.hf.safetensors_check import check_safetensors

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

Pooling = Literal["mean", "cls", "max"]


def read_json(path: Path, shown: str | None = None) -> dict[str, Any]:
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
    """Check a Hugging Face directory (see this module's and the package's docstrings) and read how to run it.

    Messages name the directory by its last part only: they reach clients, which must not learn server paths.
    """
    shown = root.name or "the model directory"
    if not root.is_dir():
        raise InvalidInput(f"{shown} is not a directory; give a Hugging Face model directory holding config.json")
    check_links(root)  # before reading anything: no file outside the directory is ever read
    if not (root / "config.json").is_file():
        raise InvalidInput(f"{shown} has no config.json; give a directory written by save_pretrained")
    config = read_json(root / "config.json")
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
    st_config = read_json(root / "sentence_bert_config.json") if (root / "sentence_bert_config.json").is_file() else {}
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
        check_safetensors(root / SAFETENSORS_FILE)
        return "safetensors"
    if (root / SAFETENSORS_INDEX).is_file():
        shards = read_json(root / SAFETENSORS_INDEX).get("weight_map", {})
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
        for shard in sorted(set(names)):
            check_safetensors(root / shard)
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
        pool = read_json(root / pool_dir / "config.json", f"{pool_dir}/config.json")
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
    tok_config = read_json(root / "tokenizer_config.json") if (root / "tokenizer_config.json").is_file() else {}
    # tokenizer_config uses a huge sentinel (1e30) for "no limit".
    limits = [st_config.get("max_seq_length"), tok_config.get("model_max_length")]
    sane = [v for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    if sane:
        return min(sane)
    positions = config.get("max_position_embeddings")
    return positions if isinstance(positions, int) and positions > 0 else 512
