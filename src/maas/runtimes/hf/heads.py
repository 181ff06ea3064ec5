"""BERT-style encoders whose attention heads were pruned: their shapes, and loading them safely.

A heads-pruned directory keeps the original ``num_attention_heads`` in ``config.json`` (the head size is
derived from it) and records the heads each layer kept under :data:`HEADS_KEY`. Stock
``AutoModel.from_pretrained`` builds every layer at full width and fails on the smaller weights, so
:func:`load_model` builds the stock model from the config, shrinks each attention block to its recorded
heads, and loads the safetensors weights strictly (never a pickle). The attention code reshapes to
``(-1, head_size)``, so the smaller blocks run as they are, in torch and in the exported ONNX graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maas.errors import InvalidInput
from maas.runtimes.hf.model_dir import SAFETENSORS_FILE, SAFETENSORS_INDEX

#: config.json key: the number of heads each layer kept, in layer order.
HEADS_KEY = "maas_attention_heads"


def attention_blocks(model: nn.Module) -> list[tuple[str, Any, nn.Linear]]:
    """(name, self-attention module, output projection) of every BERT-style attention block."""
    found = []
    for name, module in model.named_modules():
        attn, out = getattr(module, "self", None), getattr(getattr(module, "output", None), "dense", None)
        if (
            isinstance(attn, nn.Module)
            and all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("query", "key", "value"))
            and hasattr(attn, "attention_head_size")
            and isinstance(out, nn.Linear)
        ):
            found.append((name, attn, out))
    return found


def shrink_block(attn: Any, out: nn.Linear, keep: torch.Tensor) -> None:
    """Keep only the heads ``keep`` (sorted indices) of one block, rebuilding its layers at their new shapes."""
    size = attn.attention_head_size
    rows = (keep[:, None] * size + torch.arange(size)[None, :]).reshape(-1)
    for name in ("query", "key", "value"):
        old: nn.Linear = getattr(attn, name)
        new = nn.Linear(
            old.in_features, len(rows), bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device
        )
        with torch.no_grad():
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
        setattr(attn, name, new)
    with torch.no_grad():
        out.weight = nn.Parameter(out.weight.detach()[:, rows].clone())
    out.in_features = len(rows)
    attn.num_attention_heads = len(keep)
    attn.all_head_size = len(rows)


def pruned_heads(config: Any) -> list[int] | None:
    """The heads each layer kept, from a config (``transformers`` config or ``config.json`` dict); None if unpruned."""
    heads = config.get(HEADS_KEY) if isinstance(config, dict) else getattr(config, HEADS_KEY, None)
    if heads is None:
        return None
    if not isinstance(heads, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in heads):
        raise InvalidInput(f"config.json {HEADS_KEY} must list a positive head count per layer, got {heads!r}")
    return heads


def _weight_files(root: Path) -> list[Path]:
    if (root / SAFETENSORS_FILE).is_file():
        return [root / SAFETENSORS_FILE]
    if (root / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((root / SAFETENSORS_INDEX).read_text(encoding="utf-8")).get("weight_map", {})
        names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if names and all(isinstance(n, str) and "/" not in n and (root / n).is_file() for n in names):
            return [root / n for n in names]
        raise InvalidInput(f"{root}/{SAFETENSORS_INDEX} lists missing or invalid shards; save the model again")
    raise InvalidInput(
        f"{root} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}; heads-pruned models load from safetensors"
    )


def load_model(path: Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """A Hugging Face model directory as a model in eval mode, including those whose heads were pruned.

    Loads safetensors only and never runs code from the directory (``trust_remote_code=False``). A pruned
    model's weights must match its recorded shapes exactly: a missing or unexpected tensor is an error.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    root = Path(path)
    config = AutoConfig.from_pretrained(root, local_files_only=True, trust_remote_code=False)
    heads = pruned_heads(config)
    if heads is None:
        stock: nn.Module = AutoModel.from_pretrained(
            root, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=dtype
        )
        return stock.eval()
    model: nn.Module = AutoModel.from_config(config, trust_remote_code=False, dtype=dtype)  # type: ignore[no-untyped-call]
    blocks = attention_blocks(model)
    if len(blocks) != len(heads):
        raise InvalidInput(
            f"{root}/config.json lists kept heads for {len(heads)} layers under {HEADS_KEY}, but the model has "
            f"{len(blocks)} attention blocks; the directory is inconsistent, prune the parent again"
        )
    for (name, attn, out), count in zip(blocks, heads, strict=True):
        if count > attn.num_attention_heads:
            raise InvalidInput(
                f"{root}/config.json: {name} keeps {count} heads under {HEADS_KEY}, more than its "
                f"{attn.num_attention_heads}; the directory is inconsistent, prune the parent again"
            )
        shrink_block(attn, out, torch.arange(count))
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(root):
        state.update(load_file(str(file)))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise InvalidInput(
            f"{root}: the safetensors weights do not match the pruned shapes in config.json ({HEADS_KEY}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}; prune the parent again"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
