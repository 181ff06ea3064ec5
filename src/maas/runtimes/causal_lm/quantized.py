"""Causal LMs with int8 weights: the artifact layout, its checks, and the int8 linear layer that runs it.

An int8 artifact is a Hugging Face directory whose ``config.json`` says
``"maas_quantization": {"method": "int8_weight_only", "scheme": "per_channel_symmetric"}``. Each quantized weight
``W`` ``[out, in]`` is stored as ``NAME`` (int8, in [-127, 127]) and ``NAME_scale`` (float32 ``[out]``), with
``W ≈ NAME * NAME_scale[:, None]``: symmetric, one scale per output channel (per row of the embedding). Linear
weights of the layers, ``model.embed_tokens.weight`` and ``lm_head.weight`` may be int8; everything else stays a
floating-point tensor. Plain safetensors: nothing to import or unpickle.

How it runs, measured (torch 2.13, Xeon with AVX-512 BF16, one thread, SmolLM2-135M, decode steps of 4 rows):
``torch._weight_int8pack_mm`` (the kernel torchao's int8 weight-only layout calls on CPUs) takes 35 µs for a
576 -> 960 projection with bfloat16 activations, against 48 µs for a bfloat16 matmul and 101 µs in float32; with
float32 activations the same kernel takes 1,660 µs. So the model runs in bfloat16 (:class:`Int8Linear` for each
int8 weight, the embedding dequantized to bfloat16 for its lookups). The kernel reads wrong memory when the
input width is not a multiple of 16, so layers whose width is not a multiple of 32 (and every layer, should a
probe at load disagree with the dequantized reference) run as bfloat16 matmuls of the dequantized weights, and
so does a call with many rows (a long prompt's prefill), where the kernel is the slower way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from maas.errors import InvalidInput

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)

CONFIG_KEY = "maas_quantization"
METHOD = "int8_weight_only"
SCHEME = "per_channel_symmetric"
SCALE_SUFFIX = "_scale"
QMAX = 127
#: Input widths the int8 kernel runs (see the module docstring); others use dequantized bfloat16 weights.
KERNEL_WIDTH = 32
#: From this many rows on (long prompts), weights dequantized for the call beat the int8 kernel, whose time grows
#: with the rows (measured, 576 -> 3072, one thread: 4.1 ms against 1.6 ms at 128 rows, 1.1 against 1.6 at 40).
DEQUANTIZE_ROWS = 64
_QUANTIZABLE = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight|model\.embed_tokens\.weight"
    r"|lm_head\.weight"
)


def spec() -> dict[str, str]:
    """The ``config.json`` entry of an int8 artifact."""
    return {"method": METHOD, "scheme": SCHEME}


def quantizable(name: str) -> bool:
    """True for the weights that may be int8 (linear layers, the embedding, the output head)."""
    return _QUANTIZABLE.fullmatch(name) is not None


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[out, in]`` as (int8 ``[out, in]``, float32 scales ``[out]``), symmetric per output channel.

    Each scale is its row's largest magnitude / 127, rounded to the nearest bfloat16 (so the bfloat16 kernel uses
    it exactly; the largest value may round one step past 127 and is clamped, an error under a quarter step). An
    all-zero row gets scale 1."""
    w = weight.detach().float()
    if w.ndim != 2:
        raise InvalidInput(f"only 2-D weights are quantized per output channel; got shape {tuple(w.shape)}")
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax)).to(torch.bfloat16).float()
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def check(tensors: Mapping[str, torch.Tensor], config: object) -> None:
    """Refuse (``InvalidInput``, naming the tensor) a quantization entry or int8 tensors this module cannot read."""
    if not isinstance(config, dict) or config.get("method") != METHOD or config.get("scheme") != SCHEME:
        raise InvalidInput(
            f"config.json: {CONFIG_KEY} is {str(config)[:120]}; maas reads "
            f'{{"method": "{METHOD}", "scheme": "{SCHEME}"}} only'
        )
    for name, t in tensors.items():
        if t.dtype not in (torch.int8, torch.float32, torch.bfloat16, torch.float16):
            raise InvalidInput(f"{name} has dtype {t.dtype}; an int8 artifact holds int8 weights and float tensors")
    int8 = [n for n, t in tensors.items() if t.dtype == torch.int8]
    if not int8:
        raise InvalidInput(f"config.json declares {CONFIG_KEY} but no weight is int8; remove it or store int8 weights")
    for name in int8:
        _check_one(name, tensors)
    for name in tensors:
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) not in int8:
            raise InvalidInput(f"{name} is a scale without an int8 weight {name.removesuffix(SCALE_SUFFIX)}")


def _check_one(name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    q = tensors[name]
    if not quantizable(name):
        raise InvalidInput(
            f"{name} is int8, but only the linear weights of the layers, model.embed_tokens.weight and "
            "lm_head.weight may be; store it in floating point"
        )
    if q.ndim != 2:
        raise InvalidInput(f"{name} is int8 of shape {tuple(q.shape)}; a quantized weight is 2-D [out, in]")
    scale = tensors.get(name + SCALE_SUFFIX)
    if scale is None:
        raise InvalidInput(f"{name} is int8 but {name}{SCALE_SUFFIX} (float32 [{q.shape[0]}]) is missing")
    if scale.dtype != torch.float32:
        raise InvalidInput(f"{name}{SCALE_SUFFIX} has dtype {scale.dtype}; scales are float32")
    if tuple(scale.shape) != (q.shape[0],):
        raise InvalidInput(
            f"{name}{SCALE_SUFFIX} has shape {tuple(scale.shape)}; {name} {tuple(q.shape)} needs one scale per "
            f"output channel: ({q.shape[0]},)"
        )
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise InvalidInput(f"{name}{SCALE_SUFFIX} holds a NaN, infinite or negative scale")
    if bool((q == -128).any()):
        raise InvalidInput(f"{name} holds -128; symmetric int8 weights lie in [-127, 127]")


def dequantize(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 weights under the Hugging Face names, scales dropped (tensors already :func:`check`-ed)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.dtype == torch.int8:
            out[name] = t.float() * tensors[name + SCALE_SUFFIX][:, None]
        elif not name.endswith(SCALE_SUFFIX):
            out[name] = t
    return out


class Int8Linear(nn.Module):
    """``x @ (weight * scale[:, None]).T + bias``, int8 ``weight``, bfloat16 ``x`` (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.weight: torch.Tensor
        self.scale: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if rows.shape[0] >= DEQUANTIZE_ROWS:
            out = F.linear(rows, self.weight.to(torch.bfloat16) * self.scale[:, None])
        else:
            out = torch._weight_int8pack_mm(rows, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


#: Decoder linear module (as :mod:`.model` names it, after ``blocks.N.``) -> the Hugging Face weights fused into it.
_SOURCES = {
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "o": ("self_attn.o_proj.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
}


def _sources(module_name: str, tied: bool) -> tuple[str, ...]:
    if module_name == "lm_head":
        return ("model.embed_tokens.weight",) if tied else ("lm_head.weight",)
    _, layer, part = module_name.split(".")
    return tuple(f"model.layers.{layer}.{s}" for s in _SOURCES[part])


def load_int8(
    model: M,
    tensors: Mapping[str, torch.Tensor],
    config: object,
    load_state: Callable[[Mapping[str, torch.Tensor]], None],
) -> M:
    """Fill ``model`` (a fresh decoder; returned) from int8 ``tensors``: checked, dequantized into it by
    ``load_state`` (its ``load_hf_state``, which checks names and shapes), cast to bfloat16, and each linear layer
    whose weights are all int8 swapped for an :class:`Int8Linear` on the stored int8 values."""
    check(tensors, config)
    tied = model.get_submodule("lm_head").weight is model.get_submodule("embed").weight
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, module in linears.items():
        for source in _sources(name, tied):
            t = tensors.get(source)
            if t is not None and t.dtype == torch.int8 and t.shape[1] != module.in_features:
                raise InvalidInput(
                    f"{source} has shape {tuple(t.shape)}; the config says {module.in_features} input features"
                )
    load_state(dequantize(tensors))
    model.to(torch.bfloat16)
    swaps: dict[str, Int8Linear] = {}
    for name, module in linears.items():
        names = _sources(name, tied)
        if module.in_features % KERNEL_WIDTH == 0 and all(tensors[n].dtype == torch.int8 for n in names):
            weight = torch.cat([tensors[n] for n in names])
            scale = torch.cat([tensors[n + SCALE_SUFFIX] for n in names])
            swaps[name] = Int8Linear(weight, scale, module.bias)
    if not hasattr(torch, "_weight_int8pack_mm") or not _probe(model, swaps):
        log.warning("the int8 kernel is unavailable or disagrees with its reference here; using bfloat16 weights")
        return model
    for name, layer in swaps.items():
        model.set_submodule(name, layer)
    return model


def _probe(model: nn.Module, swaps: Mapping[str, Int8Linear]) -> bool:
    """The int8 kernel agrees with the dequantized bfloat16 layer it replaces, once per input width."""
    seen: set[int] = set()
    gen = torch.Generator().manual_seed(0)
    for name, layer in swaps.items():
        if layer.in_features in seen:
            continue
        seen.add(layer.in_features)
        x = torch.randn(4, layer.in_features, generator=gen).to(torch.bfloat16)
        with torch.inference_mode():
            reference = model.get_submodule(name)(x).float()
            got = layer(x).float()
        tolerance = 0.02 * float(reference.abs().max()) + 1e-3
        if not bool(torch.isfinite(got).all()) or float((got - reference).abs().max()) > tolerance:
            return False
    return True


def quantized_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a ``config.json``) marked as an int8 artifact."""
    return {**config, CONFIG_KEY: spec()}
