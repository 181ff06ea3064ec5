"""Structured pruning of attention heads in BERT-style Hugging Face encoders (``target: heads``).

Each attention block's heads are ranked by the L2 norm of their slices of the query, key and value
weights and of the output projection; the weakest ``amount`` of each block are removed by cutting those
rows of ``query``/``key``/``value`` and those columns of ``attention.output.dense`` (transformers 5 has no
``prune_heads``). The attention code reshapes to ``(-1, head_size)``, so the smaller blocks run as they are.

The result is a model directory written with ``save_pretrained`` (safetensors) beside the parent's
tokenizer and pooling files. Its ``config.json`` keeps the original ``num_attention_heads`` (the head
size is derived from it) and records the heads each layer kept under ``maas_attention_heads``. Stock
``AutoModel.from_pretrained`` cannot build such a model; :func:`maas.runtimes.hf.load_model` (re-exported
here) can, and the ``hf_transformers`` runtime and ONNX export load it through that.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from maas.compression.candidate import Candidate, StepContext, copy_dir
from maas.compression.recipe import PruneStep
from maas.errors import InvalidInput
from maas.runtimes.hf import HEADS_KEY, attention_blocks, load_model, shrink_block

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_WEIGHTS = (".safetensors", ".bin", ".onnx", ".onnx_data", ".pt", ".h5", ".msgpack")
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A model registry keeps every version of a model.",
    "Pruning removes attention heads that matter least.",
    "How far is the moon from the earth?",
]


def _head_scores(attn: Any, out: nn.Linear) -> torch.Tensor:
    size, heads = attn.attention_head_size, attn.num_attention_heads
    total = torch.zeros(heads)
    for lin in (attn.query, attn.key, attn.value):
        total += lin.weight.detach().float().reshape(heads, size, -1).pow(2).sum(dim=(1, 2))
    total += out.weight.detach().float().reshape(out.out_features, heads, size).pow(2).sum(dim=(0, 2))
    return total.sqrt()


def _texts(ctx: StepContext) -> list[str]:
    for value in ctx.example_inputs.values():
        if value.dtype == object or value.dtype.kind in "SU":
            texts = [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(value).reshape(-1)]
            if texts:
                return texts
    return _SENTENCES


def _embed(model: nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled: torch.Tensor = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return pooled


def apply(step: PruneStep, cand: Candidate, ctx: StepContext) -> Candidate:
    """A new ``hf`` candidate whose attention blocks each lost ``amount`` of their heads."""
    from transformers import AutoTokenizer

    if cand.kind != "hf" or cand.path is None:
        raise InvalidInput(
            "target 'heads' prunes Hugging Face encoders (hf_transformers directories); for ONNX and torch models "
            "use target neurons or channels"
        )
    if step.finetune is not None:
        raise InvalidInput("finetune is not supported with target 'heads' yet; remove it (or distill afterwards)")
    parent = load_model(cand.path)
    model = copy.deepcopy(parent)
    blocks = attention_blocks(model)
    if not blocks:
        raise InvalidInput(
            f"{cand.path.name}: no BERT-style attention blocks (attention.self.query/key/value and "
            "attention.output.dense) found; heads pruning supports BERT, RoBERTa, MiniLM and similar encoders"
        )
    chosen = [b for b in blocks if step.layers is None or b[0] in step.layers]
    unknown = sorted(set(step.layers or ()) - {b[0] for b in blocks})
    if unknown:
        raise InvalidInput(f"layers: no attention block {unknown}; the blocks are {', '.join(b[0] for b in blocks)}")
    before = sum(b[1].num_attention_heads for b in blocks)
    for _, attn, out in chosen:
        heads = attn.num_attention_heads
        count = max(1, heads - round(heads * step.amount))
        keep = torch.topk(_head_scores(attn, out), count).indices.sort().values
        shrink_block(attn, out, keep)
    kept = [int(b[1].num_attention_heads) for b in blocks]
    setattr(model.config, HEADS_KEY, kept)

    tokenizer = AutoTokenizer.from_pretrained(cand.path, local_files_only=True)
    texts = _texts(ctx)
    cosine = torch.nn.functional.cosine_similarity(_embed(parent, tokenizer, texts), _embed(model, tokenizer, texts))
    out_dir = ctx.subdir("pruned-heads")
    copy_dir(cand.path, out_dir, skip=lambda rel: rel.name.endswith(_WEIGHTS) or rel.as_posix() == "config.json")
    cast("PreTrainedModel", model).save_pretrained(out_dir, safe_serialization=True)
    child = cand.evolve(kind="hf", path=out_dir, module=None)
    child.history.append(
        f"prune structured heads {step.amount:.0%}: {before}->{sum(kept)} heads in {len(chosen)} attention blocks"
    )
    child.notes.append(
        f"mean-pooled embeddings of {len(texts)} texts stay at cosine {float(cosine.mean()):.4f} (min "
        f"{float(cosine.min()):.4f}) to the parent's; config.json records the kept heads under {HEADS_KEY}, "
        "so the hf_transformers runtime loads it (maas.runtimes.hf.load_model), not AutoModel.from_pretrained"
    )
    return child


__all__ = ["HEADS_KEY", "apply", "attention_blocks", "load_model", "shrink_block"]
