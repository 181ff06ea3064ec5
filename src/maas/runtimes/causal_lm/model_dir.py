"""Reading and checking a Hugging Face causal language model directory: what the decoder and the chat need.

:func:`read_causal_lm_dir` refuses a directory that would make anything run (``auto_map``, pickled weights,
links leading out of it, shard names escaping it), a model the decoder does not implement, one without a fast
tokenizer or a chat template, and a config that describes far more weights than the files hold (the decoder
allocates what the config says before it reads a weight).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maas.errors import InvalidInput, UnsupportedFormat
from maas.runtimes.hf.archive import check_links
from maas.runtimes.hf.model_dir import PICKLE_SUFFIXES, SAFETENSORS_FILE, SAFETENSORS_INDEX, read_json
from maas.runtimes.hf.safetensors_check import check_safetensors

#: Model types with Llama's layout (as :mod:`maas.runtimes.causal_lm.model` implements it).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: How far the weights may fall short of what the config describes (norms, rounding) before it is refused.
_SLACK = 1.05


@dataclass(frozen=True)
class CausalLMDir:
    """What :func:`read_causal_lm_dir` found, checked."""

    root: Path
    model_type: str
    #: Longest prompt plus completion, in tokens (``max_position_embeddings``).
    context_length: int
    chat_template: str


def is_causal_lm_config(config_json: Path) -> bool:
    """True when ``config.json`` names a ``*ForCausalLM`` architecture (unreadable JSON: False, left to the
    format that reads it to explain)."""
    try:
        config = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    names = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(names, list) and any(isinstance(a, str) and a.endswith("ForCausalLM") for a in names)


def chat_template_of(root: Path) -> str | None:
    """The chat template: ``chat_template.jinja`` if present (as transformers prefers it), else the
    ``chat_template`` of ``tokenizer_config.json`` (a string, or a list of named templates: ``default``)."""
    if (root / CHAT_TEMPLATE_FILE).is_file():
        try:
            return (root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{CHAT_TEMPLATE_FILE} cannot be read as UTF-8 text ({type(exc).__name__})") from None
    if not (root / "tokenizer_config.json").is_file():
        return None
    template = read_json(root / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def read_causal_lm_dir(root: Path) -> CausalLMDir:
    """Check a Hugging Face causal-LM directory (see the module docstring); messages name it by its last part."""
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
            "runs (there is no trust_remote_code); use a model whose architecture ships with transformers"
        )
    model_type = _check_config(shown, config)
    if not (root / "tokenizer.json").is_file():
        raise InvalidInput(
            f"{shown} has no tokenizer.json (a fast tokenizer); write one with "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir) and register again"
        )
    template = chat_template_of(root)
    if template is None:
        raise InvalidInput(
            f"{shown} has no chat template (neither {CHAT_TEMPLATE_FILE} nor a chat_template in "
            "tokenizer_config.json); maas serves chat models only: add the model's chat template and register again"
        )
    elements = _weights(root)
    implied = implied_parameters(config)
    if implied > elements * _SLACK + 1_000_000:
        raise InvalidInput(
            f"{shown}/config.json describes about {implied:,} parameters but the weights hold {elements:,}; "
            "the config does not belong to these weights"
        )
    return CausalLMDir(root, model_type, _positive(config, "max_position_embeddings", 2048), template)


def _positive(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if type(value) is not int or value <= 0:
        raise InvalidInput(f"config.json: {key} is {value!r}; expected a positive integer")
    return value


def _check_config(shown: str, config: Mapping[str, Any]) -> str:
    names = config.get("architectures")
    causal = [a for a in names if isinstance(a, str) and a.endswith("ForCausalLM")] if isinstance(names, list) else []
    if not causal:
        raise UnsupportedFormat(
            f"{shown}/config.json names architectures {names!r}; the causal_lm format takes a *ForCausalLM model "
            "(for sentence embeddings, register the directory with --format hf_transformers)"
        )
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedFormat(
            f"{shown}/config.json has model_type {str(model_type)[:40]!r}; maas runs causal language models of "
            f"model types {', '.join(SUPPORTED_MODEL_TYPES)} (Llama's layout)"
        )
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {str(config.get('hidden_act'))[:20]!r} (only silu)")
    if config.get("mlp_bias"):
        problems.append("mlp_bias (MLP layers without biases only)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type not in ("default", None):
        problems.append(f"rope type {str(rope_type)[:20]!r} (only the default rotary embedding)")
    window, positions = config.get("sliding_window"), config.get("max_position_embeddings")
    windowed = config.get("use_sliding_window", model_type == "mistral")
    if windowed and isinstance(window, int) and isinstance(positions, int) and window < positions:
        problems.append(f"sliding-window attention ({window} of {positions} positions)")
    if problems:
        raise UnsupportedFormat(f"{shown}/config.json asks for {'; '.join(problems)}, which maas does not implement")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _positive(config, key)
    return str(model_type)


def implied_parameters(config: Mapping[str, Any]) -> int:
    """Parameters a Llama-layout model with ``config`` has (what the decoder allocates)."""
    hidden, heads = _positive(config, "hidden_size"), _positive(config, "num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if type(kv) is not int or type(head_dim) is not int or kv <= 0 or head_dim <= 0:
        raise InvalidInput("config.json: num_key_value_heads and head_dim must be positive integers")
    embed = _positive(config, "vocab_size") * hidden * (1 if config.get("tie_word_embeddings") else 2)
    attention = hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * _positive(config, "intermediate_size")
    return embed + _positive(config, "num_hidden_layers") * (attention + mlp)


def _weights(root: Path) -> int:
    """Check every safetensors file the decoder reads (all of them, top level) and count their elements."""
    shown = root.name or "the model directory"
    if (root / SAFETENSORS_INDEX).is_file() and not (root / SAFETENSORS_FILE).is_file():
        shards = read_json(root / SAFETENSORS_INDEX).get("weight_map", {})
        names = set(shards.values()) if isinstance(shards, dict) else set()
        bad = sorted(
            str(n)[:100]
            for n in names
            if not isinstance(n, str) or "/" in n or "\\" in n or not n.endswith(".safetensors")
            or n.startswith(".") or not (root / n).is_file()
        )  # fmt: skip
        if not names or bad:
            raise InvalidInput(
                f"{shown}/{SAFETENSORS_INDEX} lists missing or invalid shards: {bad or 'none listed'}; every shard "
                "must be a .safetensors file in the model directory"
            )
    files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise InvalidInput(
                f"{shown} holds only pickled weights ({', '.join(pickles)}); maas never loads pickles because "
                "unpickling runs code. Convert them where you trust the file: AutoModelForCausalLM."
                "from_pretrained(dir).save_pretrained(out, safe_serialization=True), then register out"
            )
        raise InvalidInput(f"{shown} has no weights: expected {SAFETENSORS_FILE} or shards with {SAFETENSORS_INDEX}")
    total = 0
    for file in files:
        check_safetensors(file)
        total += _elements(file)
    return total


def _elements(path: Path) -> int:
    """Elements of all tensors of a safetensors file whose header :func:`check_safetensors` accepted."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return sum(math.prod(e["shape"]) for k, e in header.items() if k != "__metadata__")
