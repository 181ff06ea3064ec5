"""Process-wide server settings (per-model settings belong to a model's deployment, not here)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from maas import envs
from maas.serving.limits import RequestLimits


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: The gRPC port (Open Inference Protocol's GRPCInferenceService) on ``host``; None serves no gRPC.
    grpc_port: int | None = Field(None, ge=0, le=65535)
    #: Server processes on the same ports (``--workers``); each a whole server with its own models.
    workers: int = Field(1, ge=1, le=256)
    models: list[str] | None = None  # serve only these names; None serves every registered model
    device: str = "cpu"
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0)
    watch_interval_s: float = Field(0.5, gt=0)
    load_wait_s: float = Field(10.0, ge=0)
    infer_threads: int = Field(4, ge=1)
    #: What one request may cause (shapes, elements, JSON and output bytes); see maas.serving.limits.
    limits: RequestLimits = RequestLimits()
    #: Large or compressed bodies decoded at once; beyond it, 429 with Retry-After.
    max_concurrent_decodes: int = Field(2, ge=1)
    #: Request body bytes all requests in flight may hold together; beyond it, 503 with Retry-After.
    max_inflight_bytes: int = Field(512 * 1024 * 1024, gt=0)
    #: Open connections; more are answered 503 and closed.
    max_connections: int = Field(512, ge=1)
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    keepalive_timeout_s: float = Field(5.0, gt=0)
    write_timeout_s: float = Field(30.0, gt=0)
    #: Language models (continuous batching): compute threads, sequences per batch, queue, KV-cache memory.
    llm_threads: int = Field(1, ge=1)
    llm_max_batch: int = Field(16, ge=1, le=256)
    llm_max_queue: int = Field(64, ge=0)
    llm_kv_cache_mb: int = Field(1024, ge=1)

    @classmethod
    def from_env(cls, **overrides: object) -> ServerSettings:
        values: dict[str, object] = {
            "host": envs.MAAS_HOST,
            "port": envs.MAAS_PORT,
            "grpc_port": envs.MAAS_GRPC_PORT,
            "workers": envs.MAAS_WORKERS,
            "device": envs.MAAS_DEVICE,
            "max_request_bytes": envs.MAAS_MAX_REQUEST_BYTES,
            "watch_interval_s": envs.MAAS_WATCH_INTERVAL_S,
            "load_wait_s": envs.MAAS_LOAD_WAIT_S,
            "infer_threads": envs.MAAS_INFER_THREADS,
            "limits": RequestLimits.from_env(),
            "max_concurrent_decodes": envs.MAAS_MAX_CONCURRENT_DECODES,
            "max_inflight_bytes": envs.MAAS_MAX_INFLIGHT_BYTES,
            "max_connections": envs.MAAS_MAX_CONNECTIONS,
            "header_timeout_s": envs.MAAS_HEADER_TIMEOUT_S,
            "body_timeout_s": envs.MAAS_BODY_TIMEOUT_S,
            "keepalive_timeout_s": envs.MAAS_KEEPALIVE_TIMEOUT_S,
            "write_timeout_s": envs.MAAS_WRITE_TIMEOUT_S,
            "llm_threads": envs.MAAS_LLM_THREADS,
            "llm_max_batch": envs.MAAS_LLM_MAX_BATCH,
            "llm_max_queue": envs.MAAS_LLM_MAX_QUEUE,
            "llm_kv_cache_mb": envs.MAAS_LLM_KV_CACHE_MB,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
