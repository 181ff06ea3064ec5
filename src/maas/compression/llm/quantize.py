"""A causal LM's weights rewritten into a new Hugging Face directory: int8 per output channel
(:mod:`maas.runtimes.causal_lm.quantized` defines the layout, and loads it) or bfloat16.

``weight_only`` follows torchao's int8 weight-only scheme (symmetric, one scale per output channel, the layout its
CPU kernel ``torch._weight_int8pack_mm`` takes) but stores plain tensors: int8 weights and float32 scales in
safetensors, so loading needs neither torchao nor unpickling. The linear weights of every layer and the embedding
(which is also the output head when they are tied) become int8; norms stay float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from maas.errors import InvalidInput
from maas.runtimes.causal_lm import quantized

WEIGHTS_FILE = "model.safetensors"
#: Parent files not copied: its weights (rewritten), the shard index, the GGUF cache's manifest.
_NOT_COPIED = ("model.safetensors.index.json", "maas-cache.json")


def write_child(parent_dir: Path, out: Path, mode: Literal["weight_only", "bfloat16"]) -> str:
    """The parent's directory rewritten at ``out`` (tokenizer and template copied); a one-line summary."""
    config: dict[str, Any] = json.loads((parent_dir / "config.json").read_text("utf-8"))
    if quantized.CONFIG_KEY in config:
        raise InvalidInput(
            "the parent is already int8 (its config.json has maas_quantization); compress its float parent instead"
        )
    out.mkdir(parents=True, exist_ok=False)
    for f in sorted(parent_dir.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name not in _NOT_COPIED and not f.name.startswith("."):
            shutil.copyfile(f, out / f.name)
    tensors = _read(parent_dir)
    if mode == "bfloat16":
        written = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in tensors.items()}
        config["dtype"] = "bfloat16"
        summary = f"{len(written)} tensors cast to bfloat16"
    else:
        written = {}
        for name, t in tensors.items():
            if quantized.quantizable(name) and t.ndim == 2 and t.is_floating_point():
                written[name], written[name + quantized.SCALE_SUFFIX] = quantized.quantize_weight(t)
            else:
                written[name] = t.float() if t.is_floating_point() else t
        config = quantized.quantized_config(config)
        n_int8 = sum(t.dtype == torch.int8 for t in written.values())
        summary = (
            f"{n_int8} weights int8 per output channel (float32 scales), {len(tensors) - n_int8} tensors kept float32"
        )
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in written.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return summary


def _read(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = fh.get_tensor(name)
    if not tensors:
        raise InvalidInput(f"{directory.name} has no safetensors weights to compress")
    return tensors
