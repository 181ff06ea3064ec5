"""Process-wide server settings (per-model settings belong to a model's deployment, not here)."""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from maas import envs
from maas.errors import InvalidInput
from maas.serving.access.mode import parse_mode
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
    #: TLS for REST and gRPC alike: a PEM certificate chain and its (unencrypted) PEM private key; both or neither.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    #: API keys: auto (required off loopback), required or disabled; see maas.serving.access.mode.
    auth: str = Field("auto", pattern="^(auto|required|disabled)$")
    #: Serve a non-loopback address with auth disabled (the operator says a proxy in front does it).
    allow_unauthenticated: bool = False

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
            "ssl_certfile": envs.MAAS_SSL_CERTFILE,
            "ssl_keyfile": envs.MAAS_SSL_KEYFILE,
            "auth": str(envs.MAAS_AUTH).strip().lower(),
            "allow_unauthenticated": str(envs.MAAS_ALLOW_UNAUTHENTICATED or "").strip().lower() in ("1", "true", "yes"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["auth"] = str(parse_mode(str(values["auth"])))  # a clear error naming MAAS_AUTH, not pydantic's
        return cls.model_validate(values)

    def tls(self) -> tuple[bytes, bytes] | None:
        """The (private key, certificate chain) PEM bytes when TLS is on, checked to be a matching pair; None when
        off. Raises ``InvalidInput`` naming the option to fix."""
        if self.ssl_certfile is None and self.ssl_keyfile is None:
            return None
        if self.ssl_certfile is None or self.ssl_keyfile is None:
            given, missing = (
                ("--ssl-certfile (MAAS_SSL_CERTFILE)", "--ssl-keyfile (MAAS_SSL_KEYFILE)")
                if self.ssl_keyfile is None
                else ("--ssl-keyfile (MAAS_SSL_KEYFILE)", "--ssl-certfile (MAAS_SSL_CERTFILE)")
            )
            raise InvalidInput(
                f"{given} is given but {missing} is not; TLS needs both: the PEM certificate chain and its PEM "
                "private key"
            )
        cert = _read_pem(self.ssl_certfile, "--ssl-certfile", b"-----BEGIN CERTIFICATE-----", "certificate")
        key = _read_pem(self.ssl_keyfile, "--ssl-keyfile", b"PRIVATE KEY-----", "private key")
        if b"ENCRYPTED" in key:
            raise InvalidInput(
                f"--ssl-keyfile {self.ssl_keyfile} is encrypted with a passphrase, which the gRPC endpoint cannot "
                "use; decrypt it (`openssl pkey -in KEY -out KEY.plain`) and protect the file with `chmod 600`"
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password="")  # never a prompt
        except ssl.SSLError as exc:
            raise InvalidInput(
                f"--ssl-certfile {self.ssl_certfile} and --ssl-keyfile {self.ssl_keyfile} are not a usable pair "
                f"({exc.reason or exc}); give the certificate chain and the private key it was issued for"
            ) from None
        return key, cert


def _read_pem(name: str, option: str, marker: bytes, what: str) -> bytes:
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{option} {name} cannot be read ({exc.strerror}); give a readable PEM file") from None
    if marker not in data:
        raise InvalidInput(f"{option} {name} is not a PEM file holding a {what} (no {marker.decode()!r})")
    return data
