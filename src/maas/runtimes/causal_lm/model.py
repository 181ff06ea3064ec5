"""A Llama-family decoder in plain torch, shaped for continuous batching on a CPU.

Hugging Face's modules run one batch with one cache. Here every sequence owns its KV cache (:class:`KVCache`,
grown in chunks, freed when the sequence goes), the linear layers of a decoding step run on all sequences at once
(one row each), and attention runs per sequence over exactly its own keys. A sequence's attention is therefore
computed the same way whatever else shares the step, and a finished or cancelled one gives back its memory at once.

The weights are a Hugging Face Llama checkpoint's (``config.json`` and safetensors, the names ``model.layers.N...``);
query/key/value and gate/up projections are fused into one matrix each, so a layer is four matrix products.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from maas import envs
from maas.errors import InvalidInput
from maas.runtimes.causal_lm.kv_cache import CACHE_CHUNK, KVCache
from maas.runtimes.causal_lm.precision import flushed_denormals
from maas.runtimes.causal_lm.quantized import load_int8

#: Model types whose checkpoints have Llama's layout (GQA attention, RMSNorm, SwiGLU MLP, rotary positions).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: A decoding step runs a multiple of this many rows through the linear layers (padding with dummy rows): CPU matrix
#: kernels compute rows in tiles of four, and a row in a partial tile (or a lone row) is summed in another order
#: (measured with oneDNN/MKL on 1 and 2 threads, checked by the tests). So a sequence's tokens do not depend on how
#: many others share its steps.
ROW_TILE = 4


__all__ = ["CACHE_CHUNK", "ROW_TILE", "SUPPORTED_MODEL_TYPES", "DecoderLM", "KVCache", "LMConfig"]


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    context_length: int
    tie_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> LMConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidInput(
                f"model_type {model_type!r} is not supported by maas's language-model engine; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise InvalidInput(f"rope type {rope_type!r} is not supported yet; only the default rotary embedding")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                context_length=int(cfg.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"config.json lacks or mistypes a model setting: {exc}") from None

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of keys and values one token holds in the cache, all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype.itemsize


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Block(nn.Module):
    """One decoder layer: attention (fused q/k/v) and SwiGLU MLP (fused gate/up), pre-norm, residual."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.qkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.o = nn.Linear(q, cfg.hidden_size, bias=False)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        out: torch.Tensor = self.down(F.silu(gate) * up)
        return out

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows ``[n, hidden]`` -> rotated queries ``[n, heads, d]``, keys and values ``[n, kv_heads, d]``."""
        cfg = self.cfg
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = self.qkv(self.input_norm(x)).split((q_size, kv_size, kv_size), dim=-1)
        q = _rotate(q.view(-1, cfg.num_heads, cfg.head_dim), cos, sin)
        k = _rotate(k.view(-1, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        return q, k, v.view(-1, cfg.num_kv_heads, cfg.head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Hugging Face's half-split layout: ``x`` ``[n, heads, d]``, ``cos``/``sin`` ``[n, 1, d]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLM(nn.Module):
    """The decoder. :meth:`prefill` runs one sequence's prompt into its cache; :meth:`decode` runs one new token
    for each of several sequences at once. Both return logits ``[rows, vocab]`` (float32)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    @property
    def layers(self) -> list[Block]:
        return [cast(Block, b) for b in self.blocks]

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def kv_bytes_per_token(self) -> int:
        return self.cfg.kv_bytes_per_token(self.dtype)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.cfg, capacity, self.dtype)

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def prefill(self, ids: Sequence[int], cache: KVCache) -> torch.Tensor:
        """Run ``ids`` (continuing what ``cache`` holds) and return the logits of the last position ``[1, vocab]``."""
        last = self.step((), (), ids, cache)[1]
        assert last is not None
        return last

    def decode(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> torch.Tensor:
        """One step: token ``tokens[j]`` appended to sequence ``caches[j]``; logits ``[len(tokens), vocab]``."""
        return self.step(tokens, caches)[0]

    def step(
        self,
        tokens: Sequence[int],
        caches: Sequence[KVCache],
        chunk: Sequence[int] = (),
        chunk_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See :meth:`_forward`; run with denormals flushed (:func:`flushed_denormals`)."""
        with flushed_denormals():
            return self._forward(tokens, caches, chunk, chunk_cache)

    @torch.inference_mode()
    def _forward(
        self,
        tokens: Sequence[int],
        caches: Sequence[KVCache],
        chunk: Sequence[int] = (),
        chunk_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass for both kinds of work: a new token for each sequence ``caches[j]`` (logits
        ``[len(tokens), vocab]``) and, if given, a ``chunk`` of one sequence's prompt continuing ``chunk_cache``
        (the logits of its last position ``[1, vocab]``). The weights are read once for all rows.

        The decoding rows come first and the chunk's after them, each padded to whole :data:`ROW_TILE` tiles, so
        each row's result is the same whatever else shares the pass (on one compute thread or several)."""
        cfg = self.cfg
        for cache in caches:
            cache.reserve(1)
        positions = [c.length for c in caches]
        rows = len(tokens) + (-len(tokens) % ROW_TILE)
        pad = rows - len(tokens)
        n = len(chunk)
        tail = -n % ROW_TILE  # the chunk's rows padded to whole tiles too
        start = chunk_cache.length if chunk_cache is not None else 0
        if n:
            assert chunk_cache is not None
            chunk_cache.reserve(n)
        x = self.embed(torch.tensor([*tokens, *[0] * pad, *chunk, *[0] * tail], dtype=torch.long))
        cos, sin = self._angles(torch.tensor([*positions, *[0] * pad, *range(start, start + n), *[0] * tail]))
        group = cfg.num_heads // cfg.num_kv_heads
        blank = torch.zeros(cfg.num_heads * cfg.head_dim, dtype=self.dtype)
        for i, block in enumerate(self.layers):
            q, k, v = block.project(x, cos, sin)
            scaled = q[: len(tokens)] * self.scale  # once for all rows: the loop below runs per sequence
            outs = []
            for j, (cache, pos) in enumerate(zip(caches, positions, strict=True)):
                cache.k[i, :, pos] = k[j]
                cache.v[i, :, pos] = v[j]
                keys, values = cache.k[i, :, : pos + 1], cache.v[i, :, : pos + 1]  # [kv, L, d]
                qj = scaled[j].view(cfg.num_kv_heads, group, cfg.head_dim)  # heads grouped by the kv head they share
                scores = torch.matmul(qj, keys.transpose(1, 2)).softmax(-1)
                outs.append(torch.matmul(scores, values).view(-1))
            outs.extend([blank] * pad)
            if n:
                assert chunk_cache is not None
                end = rows + n
                outs.append(self._chunk_attention(i, q[rows:end], k[rows:end], v[rows:end], chunk_cache, start))
                outs.append(torch.zeros(tail, blank.shape[0], dtype=self.dtype))
            x = x + block.o(torch.cat([torch.stack(outs[:rows]), *outs[rows:]]) if rows else torch.cat(outs))
            x = x + block.mlp(x)
        for cache in caches:
            cache.length += 1
        if chunk_cache is not None:
            chunk_cache.length = start + n
        logits: torch.Tensor = self.lm_head(self.norm(x[:rows]))[: len(tokens)].float()
        last = self.lm_head(self.norm(x[rows + n - 1 : rows + n])).float() if n else None
        return logits, last

    def _chunk_attention(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        """Causal attention of a prompt chunk's rows over the cached positions and themselves: ``[n, heads * d]``."""
        cfg, n = self.cfg, q.shape[0]
        end = start + n
        cache.k[i, :, start:end] = k.transpose(0, 1)
        cache.v[i, :, start:end] = v.transpose(0, 1)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            cache.k[i, :, :end][None],
            cache.v[i, :, :end][None],
            attn_mask=_causal(n, start, q.device) if start else None,
            is_causal=not start,
            enable_gqa=cfg.num_heads != cfg.num_kv_heads,
        )
        return attn[0].transpose(0, 1).reshape(n, -1)

    @torch.inference_mode()
    def greedy(
        self, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: frozenset[int] = frozenset()
    ) -> list[int]:
        """The plain one-sequence greedy loop (ties to the lowest id): the reference the batching engine must match."""
        if not prompt_ids:
            raise InvalidInput("an empty prompt; give at least one token")
        budget = min(max_new_tokens, self.context_length - len(prompt_ids))
        cache = self.new_cache(len(prompt_ids) + max(budget, 0))
        logits = self.prefill(prompt_ids, cache)
        out: list[int] = []
        while len(out) < budget:
            token = int(torch.argmax(logits[0]))
            if token in stop_ids:
                break
            out.append(token)
            if len(out) == budget:
                break
            logits = self.decode([token], [cache])
        return out

    @classmethod
    def from_pretrained_dir(
        cls, directory: Path, *, threads: int | None = None, weights: str | None = None
    ) -> DecoderLM:
        """Build from a Hugging Face directory: ``config.json`` and safetensors weights (one file or shards). A model
        stored in bfloat16 computes in bfloat16. A float32 one keeps float32 activations; its matrices are held as
        ``weights`` says (see :meth:`with_weights`; None: ``MAAS_LLM_WEIGHTS``)."""
        from safetensors import safe_open

        if threads is not None:
            torch.set_num_threads(max(1, threads))
        cfg = LMConfig.from_hf(raw := json.loads((directory / "config.json").read_text("utf-8")))
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise InvalidInput(f"{directory.name} has no safetensors weights")
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[name] = fh.get_tensor(name)
        model = cls(cfg)
        if "maas_quantization" in raw:  # int8 weights with per-channel scales: see .quantized
            return load_int8(model, tensors, raw["maas_quantization"], model.load_hf_state).eval()
        model.load_hf_state(tensors)
        if tensors and all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point()):
            return model.to(torch.bfloat16).eval()
        return model.with_weights(weights).eval()

    def with_weights(self, weights: str | None = None) -> DecoderLM:
        """Hold the matrices of the linear layers in float32 or bfloat16 (``auto``: bfloat16 where the CPU multiplies
        it natively, AVX-512 BF16 or AMX). Activations, norms, attention and the KV cache stay float32; only the
        matrix products read bfloat16 weights (measured here: 2.0-2.4x faster decoding steps than float32, but
        rounding changes some greedy answers). float32 matrices are run by oneDNN where it checks out
        (:func:`~maas.runtimes.causal_lm.precision.onednn_linear`: 1.4x faster steps, the same arithmetic). The
        embedding table stays float32; a tied output layer gets its own copy. None: ``MAAS_LLM_WEIGHTS`` (float32)."""
        choice = (weights or envs.MAAS_LLM_WEIGHTS or "float32").lower()
        if choice not in ("auto", "float32", "bfloat16"):
            raise InvalidInput(f"MAAS_LLM_WEIGHTS={choice!r}; expected auto, float32 or bfloat16")
        from maas.runtimes.causal_lm.precision import LowPrecisionLinear, native_bf16, onednn_linear

        if choice == "auto":
            choice = "bfloat16" if native_bf16() else "float32"
        if self.dtype != torch.float32:
            return self

        def held(linear: nn.Module) -> nn.Module:
            if not isinstance(linear, nn.Linear):  # held already
                return linear
            return onednn_linear(linear) if choice == "float32" else LowPrecisionLinear(linear, torch.bfloat16)

        for block in self.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(block, name, held(getattr(block, name)))
        self.lm_head = held(self.lm_head)  # type: ignore[assignment]
        return self

    def load_hf_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy a Hugging Face Llama state dict in, fusing q/k/v and gate/up; names what is missing or misshapen."""

        def get(name: str) -> torch.Tensor:
            if name not in tensors:
                raise InvalidInput(f"the weights lack {name}")
            return tensors[name].float()

        def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
            if tuple(param.shape) != tuple(value.shape):
                raise InvalidInput(f"{name} has shape {tuple(value.shape)}; the config says {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value)

        put(self.embed.weight, get("model.embed_tokens.weight"), "model.embed_tokens.weight")
        put(self.norm.weight, get("model.norm.weight"), "model.norm.weight")
        if not self.cfg.tie_embeddings:
            put(self.lm_head.weight, get("lm_head.weight"), "lm_head.weight")
        for i, block in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = [get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
            put(block.qkv.weight, torch.cat(attn), p + "self_attn.{q,k,v}_proj.weight")
            if block.qkv.bias is not None:
                bias = [get(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
                put(block.qkv.bias, torch.cat(bias), p + "self_attn.{q,k,v}_proj.bias")
            put(block.o.weight, get(p + "self_attn.o_proj.weight"), p + "self_attn.o_proj.weight")
            mlp = [get(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
            put(block.gate_up.weight, torch.cat(mlp), p + "mlp.{gate,up}_proj.weight")
            put(block.down.weight, get(p + "mlp.down_proj.weight"), p + "mlp.down_proj.weight")
            put(block.input_norm.weight, get(p + "input_layernorm.weight"), p + "input_layernorm.weight")
            put(
                block.post_norm.weight,
                get(p + "post_attention_layernorm.weight"),
                p + "post_attention_layernorm.weight",
            )


def _causal(n: int, start: int, device: torch.device) -> torch.Tensor:
    """Boolean mask ``[n, start + n]``: row r sees the ``start`` cached positions and new positions up to r."""
    rows = torch.arange(n, device=device)[:, None] + start
    return torch.arange(start + n, device=device)[None, :] <= rows
