"""The torch side of ``hf_transformers``: the sentence-embedding module, loaded from safetensors.

:class:`SentenceEmbedder` wraps a ``transformers`` model with the directory's pooling and normalisation,
so one ``forward`` goes from token ids to the served ``embedding``. The runtime runs it
(:class:`TorchBackend`); :func:`maas.runtimes.hf.export.export_onnx` exports it whole.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np
import torch

from maas.errors import InvalidInput
from maas.runtimes.base import brief, resolve_device
from maas.runtimes.hf.heads import load_model
from maas.runtimes.hf.model_dir import FEED_NAMES, ONNX_FILE, ModelDir, Pooling


class SentenceEmbedder(torch.nn.Module):
    """``forward(input_ids, attention_mask[, token_type_ids]) -> embedding [batch, hidden]``."""

    def __init__(self, model: torch.nn.Module, pooling: Pooling, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        #: The feed names ``forward`` takes, in order: token_type_ids only when the model has them.
        params = inspect.signature(model.forward).parameters
        self.feed_names = [n for n in FEED_NAMES if n in params]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values  # -1e9: as sentence-transformers
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def load_embedder(info: ModelDir, device: str = "cpu") -> SentenceEmbedder:
    """The directory's safetensors model as a :class:`SentenceEmbedder` in eval mode, fp32, on ``device``.

    Never runs code from the directory: ``read_model_dir`` refused ``auto_map`` configs, and
    transformers loads with ``trust_remote_code=False`` and safetensors only. Directories whose
    attention heads were pruned are built at their recorded shapes (:mod:`maas.runtimes.hf.heads`).
    """
    import transformers

    if info.weights != "safetensors":
        raise InvalidInput(f"{info.root.name} holds no safetensors weights (it has {ONNX_FILE}); torch cannot run it")
    # The per-load progress bar goes to stderr, outside logging; a server loads quietly.
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model = load_model(info.root, dtype=torch.float32)
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(f"transformers cannot load {info.root.name}: {brief(exc)}") from None
    return SentenceEmbedder(model, info.pooling, info.normalize).eval().to(device)


class TorchBackend:
    """The runtime's torch backend. Inference holds no per-call state, so threads share the module."""

    def __init__(self, info: ModelDir, device: str) -> None:
        self.device = resolve_device(device, cuda_available=torch.cuda.is_available(), runtime="torch")
        self.module: SentenceEmbedder | None = load_embedder(info, self.device)

    def __call__(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        module = self.module
        if module is None:
            raise RuntimeError("this torch backend was closed; load the model again")
        args = [torch.from_numpy(feed[n]).to(self.device) for n in module.feed_names]
        with torch.inference_mode():
            embedding: np.ndarray = module(*args).float().cpu().numpy()
        return embedding

    def close(self) -> None:
        self.module = None
        if self.device == "cuda":
            torch.cuda.empty_cache()
