"""``POST /v1/embeddings`` over the ``hf_transformers`` embedding models: texts in, one vector each out, run through
the serving engine as an Open Inference Protocol request would be (same batching, queue and limits)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from maas.serving.api.openai.models import EMBEDDING, InvalidModel, ModelDirectory, require_format, served_at
from maas.serving.api.openai.protocol import BadParam, EmbeddingRequest
from maas.serving.context import ServingContext
from maas.serving.engine.types import InferRequest
from maas.serving.validation import check_input
from maas.tensors import Signature


async def embed(ctx: ServingContext, directory: ModelDirectory, req: EmbeddingRequest) -> dict[str, Any]:
    """The ``list`` of embeddings of ``req.input``, in order, with the tokens the model read."""
    loaded = await directory.acquire(req.model)
    require_format(loaded, EMBEDDING)
    signature = loaded.version_info.signature
    output = signature.output("embedding")
    width = output.shape[-1] if output is not None and len(output.shape) == 2 else None
    if req.dimensions is not None and req.dimensions != width:
        raise BadParam(
            f"dimensions: {loaded.version_info.uri} returns {width} dimensions and is not trained for shorter "
            f"embeddings; leave dimensions out (or send {width})",
            "dimensions",
        )
    texts = [t.encode("utf-8") for t in req.input]
    limits = ctx.engine.limits

    def decode(sig: Signature) -> InferRequest:
        spec = sig.input("text")
        if spec is None or spec.datatype != "BYTES" or sig.output("embedding") is None:
            raise InvalidModel(f"{loaded.version_info.uri} does not take texts and return embeddings")
        check_input(spec, "BYTES", [len(texts)], limits)
        for i, text in enumerate(texts):
            limits.check_bytes_element("text", i, len(text))
        return InferRequest({"text": np.array(texts, dtype=object)}, outputs=["embedding"])

    size = sum(len(t) for t in texts)
    ran, response = await ctx.engine.infer(loaded.name, str(loaded.version), decode, size=size)
    vectors = np.ascontiguousarray(response.outputs["embedding"], dtype=np.float32)
    tokens = await _count_tokens(ctx, ran.runtime, req.input)  # the engine metered the same count
    if req.encoding_format == "base64":
        # Little-endian float32, as the openai client decodes it.
        rows: list[Any] = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    else:
        rows = list(vectors)  # serialised by orjson straight from numpy
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": served_at(ran),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def _count_tokens(ctx: ServingContext, runtime: object, texts: Sequence[str]) -> int:
    """The tokens the model read (after its truncation), as the engine metered them; 0 if it cannot count."""
    count = getattr(runtime, "count_tokens", None)
    if count is None:
        return 0
    feed = {"text": np.array([t.encode("utf-8") for t in texts], dtype=object)}
    read, _ = await asyncio.get_running_loop().run_in_executor(ctx.executor, count, feed)
    return int(read)
