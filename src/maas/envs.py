"""Every ``MAAS_*`` setting, declared, typed and documented in one place.

Nothing else in maas reads ``os.environ`` for a ``MAAS_*`` name. Values are read when accessed, so a
test (or a child process) that changes the environment sees the change::

    from maas import envs
    envs.MAAS_HOME  # -> Path
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _path(name: str, default: str) -> Callable[[], Path]:
    return lambda: Path(os.environ.get(name) or default).expanduser()


def _str(name: str, default: str | None) -> Callable[[], str | None]:
    return lambda: os.environ.get(name) or default


def _num(name: str, default: float, cast: Callable[[str], Any] = float) -> Callable[[], Any]:
    def read() -> Any:
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return cast(str(default))
        try:
            return cast(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__}; unset it or give a number") from None

    return read


# name -> (reader, documentation). The README's settings table is generated from these docs.
environment_variables: dict[str, tuple[Callable[[], Any], str]] = {
    "MAAS_HOME": (
        _path("MAAS_HOME", "~/.maas"),
        "Root of the embedded default: the SQLite registry database and the artifact store live here.",
    ),
    "MAAS_DATABASE_URL": (
        _str("MAAS_DATABASE_URL", None),
        "SQLAlchemy URL of the metadata store (e.g. postgresql+psycopg://…); default sqlite:///$MAAS_HOME/maas.db.",
    ),
    "MAAS_RUNS_DIR": (
        _str("MAAS_RUNS_DIR", None),
        "Where training runs keep their folders (checkpoints, exports); default $MAAS_HOME/runs. On several "
        "machines: one folder on a filesystem they all share, with MAAS_HOME (and its SQLite database) local.",
    ),
    "MAAS_DB_BUSY_TIMEOUT_S": (
        _num("MAAS_DB_BUSY_TIMEOUT_S", 60.0),
        "How long a SQLite writer waits for the database lock before giving up.",
    ),
    "MAAS_HOST": (_str("MAAS_HOST", "127.0.0.1"), "Address `maas serve` binds to."),
    "MAAS_PORT": (_num("MAAS_PORT", 8000, int), "Port `maas serve` listens on."),
    "MAAS_GRPC_PORT": (
        _num("MAAS_GRPC_PORT", 8001, int),
        "Port of `maas serve`'s gRPC endpoint (Open Inference Protocol); `--no-grpc` turns it off.",
    ),
    "MAAS_WORKERS": (
        _num("MAAS_WORKERS", 1, int),
        "Server processes `maas serve` runs on the same ports (`--workers`); over 1, a supervisor process starts "
        "them, restarts any that dies and stops them all on Ctrl-C.",
    ),
    "MAAS_MAX_REQUEST_BYTES": (
        _num("MAAS_MAX_REQUEST_BYTES", 64 * 1024 * 1024, int),
        "Largest request body the server accepts; larger bodies get 413.",
    ),
    "MAAS_MAX_JSON_BYTES": (
        _num("MAAS_MAX_JSON_BYTES", 8 * 1024 * 1024, int),
        "Largest JSON part of an inference request (the whole body, or the header before binary tensors), also "
        "after inflating; larger gets 413. JSON costs far more to parse than binary tensors.",
    ),
    "MAAS_MAX_INFLATED_BYTES": (
        _str("MAAS_MAX_INFLATED_BYTES", None),
        "Largest size a gzip or deflate request body may inflate to; larger gets 413. Default: MAAS_MAX_REQUEST_BYTES.",
    ),
    "MAAS_MAX_TENSOR_ELEMENTS": (
        _num("MAAS_MAX_TENSOR_ELEMENTS", 1 << 24, int),
        "Most elements in one request tensor: the product of its non-zero dimensions (also the largest "
        "dimension); more gets 413.",
    ),
    "MAAS_MAX_BYTES_ELEMENTS": (
        _num("MAAS_MAX_BYTES_ELEMENTS", 16_384, int),
        "Most elements in one BYTES (text) tensor of a request; more gets 413.",
    ),
    "MAAS_MAX_BYTES_ELEMENT_BYTES": (
        _num("MAAS_MAX_BYTES_ELEMENT_BYTES", 1024 * 1024, int),
        "Longest single BYTES element (one text) in a request, in bytes; longer gets 413.",
    ),
    "MAAS_MAX_OUTPUT_BYTES": (
        _num("MAAS_MAX_OUTPUT_BYTES", 64 * 1024 * 1024, int),
        "Largest response tensors (raw bytes, summed over outputs); larger gets 413 instead of a response.",
    ),
    "MAAS_MAX_CONCURRENT_DECODES": (
        _num("MAAS_MAX_CONCURRENT_DECODES", 2, int),
        "Large or compressed request bodies decoded at once; more at the same time get 429 with Retry-After.",
    ),
    "MAAS_MAX_CONNECTIONS": (
        _num("MAAS_MAX_CONNECTIONS", 512, int),
        "Open client connections the server keeps; more are answered 503 and closed.",
    ),
    "MAAS_MAX_INFLIGHT_BYTES": (
        _num("MAAS_MAX_INFLIGHT_BYTES", 512 * 1024 * 1024, int),
        "Request body bytes held by all requests in flight together; a request over it gets 503 with Retry-After.",
    ),
    "MAAS_HEADER_TIMEOUT_S": (
        _num("MAAS_HEADER_TIMEOUT_S", 10.0),
        "Seconds a client has to send a request's headers, from its first byte (or from connecting); then the "
        "connection is closed (408 when part of a request had arrived).",
    ),
    "MAAS_BODY_TIMEOUT_S": (
        _num("MAAS_BODY_TIMEOUT_S", 60.0),
        "Seconds a client has to send a whole request body once its headers arrived; then 408 and the connection "
        "is closed.",
    ),
    "MAAS_KEEPALIVE_TIMEOUT_S": (
        _num("MAAS_KEEPALIVE_TIMEOUT_S", 5.0),
        "Seconds an idle keep-alive connection stays open between requests.",
    ),
    "MAAS_WRITE_TIMEOUT_S": (
        _num("MAAS_WRITE_TIMEOUT_S", 30.0),
        "Seconds a client may leave a response unread (no progress at all) before its connection is dropped.",
    ),
    "MAAS_WATCH_INTERVAL_S": (
        _num("MAAS_WATCH_INTERVAL_S", 0.5),
        "How often the server polls the registry for alias moves and new versions.",
    ),
    "MAAS_LOAD_WAIT_S": (
        _num("MAAS_LOAD_WAIT_S", 10.0),
        "How long a request waits for its model to finish loading before it gets 503.",
    ),
    "MAAS_INFER_THREADS": (
        _num("MAAS_INFER_THREADS", 4, int),
        "Threads that run inference off the event loop.",
    ),
    "MAAS_RUNTIME_THREADS": (
        _num("MAAS_RUNTIME_THREADS", 0, int),
        "Compute threads of one model run (ONNX Runtime intra-op threads; torch's per process); 0: the runtime's "
        "default, or the CPU count divided by the workers under `--workers N`. A deployment's `threads` wins.",
    ),
    "MAAS_LLM_THREADS": (
        _num("MAAS_LLM_THREADS", 1, int),
        "Compute threads of a language model's generation steps (torch's, per process). 1 by default: on 2 busy "
        "cores two threads measured 5-8x slower per token than one.",
    ),
    "MAAS_LLM_WEIGHTS": (
        _str("MAAS_LLM_WEIGHTS", "float32"),
        "How a float32 language model holds its matrices: float32 (the model as registered), bfloat16 (activations "
        "stay float32; 2-2.4x faster decoding here, but rounding changes some greedy answers: SmolLM2 flips on 1 of "
        "3 test prompts), or auto (bfloat16 where the CPU has AVX-512 BF16 or AMX). A compressed child version is "
        "the measured way to trade quality for speed.",
    ),
    "MAAS_LLM_MAX_BATCH": (
        _num("MAAS_LLM_MAX_BATCH", 16, int),
        "Sequences a language model decodes together (continuous batching); more wait in its queue.",
    ),
    "MAAS_LLM_MAX_QUEUE": (
        _num("MAAS_LLM_MAX_QUEUE", 64, int),
        "Generation requests that may wait per language model; beyond it, 429 with Retry-After.",
    ),
    "MAAS_LLM_KV_CACHE_MB": (
        _num("MAAS_LLM_KV_CACHE_MB", 1024, int),
        "KV-cache memory per language model; a request waits until its prompt fits (one runs regardless when "
        "nothing else does).",
    ),
    "MAAS_AUTH": (
        _str("MAAS_AUTH", "auto"),
        "API keys: auto (required on any bind but a loopback address, off on loopback), required, or disabled "
        "(refused on a non-loopback bind unless `maas serve --allow-unauthenticated`).",
    ),
    "MAAS_ALLOW_UNAUTHENTICATED": (
        _str("MAAS_ALLOW_UNAUTHENTICATED", None),
        "Set to 1 to serve with MAAS_AUTH=disabled on a non-loopback address (same as --allow-unauthenticated).",
    ),
    "MAAS_AUTH_CACHE_S": (
        _num("MAAS_AUTH_CACHE_S", 1.0),
        "How long a server trusts a key it looked up; a revoked or expired key fails within this time.",
    ),
    "MAAS_AUTH_MAX_FAILURES": (
        _num("MAAS_AUTH_MAX_FAILURES", 10, int),
        "Failed key checks a client address may make per minute before its further failing attempts are slowed "
        "and answered 429; 0 turns the throttle off.",
    ),
    "MAAS_REDIS_URL": (
        _str("MAAS_REDIS_URL", None),
        "redis://host:port/db keeping rate-limit and quota counters for every server process; default: the "
        "metadata database.",
    ),
    "MAAS_USAGE_RETENTION_DAYS": (
        _num("MAAS_USAGE_RETENTION_DAYS", 400, int),
        "Days of per-minute usage rows a server keeps; older rows are deleted.",
    ),
    "MAAS_SERVER_URL": (
        _str("MAAS_SERVER_URL", None),
        "When set (http[s]://host:port), `maas models|keys|usage|audit|deployments` act on that server through "
        "its admin API instead of the local registry.",
    ),
    "MAAS_API_KEY": (
        _str("MAAS_API_KEY", None),
        "The API key the `maas` CLI sends to MAAS_SERVER_URL (and `maas chat` to its server).",
    ),
    "MAAS_SSL_CERTFILE": (_str("MAAS_SSL_CERTFILE", None), "PEM certificate chain `maas serve` uses for TLS."),
    "MAAS_SSL_KEYFILE": (_str("MAAS_SSL_KEYFILE", None), "PEM private key of MAAS_SSL_CERTFILE."),
    "MAAS_SSL_CA_FILE": (
        _str("MAAS_SSL_CA_FILE", None),
        "PEM bundle the `maas` CLI trusts for an https MAAS_SERVER_URL (default: the system's).",
    ),
    "MAAS_ARTIFACT_KEY_FILE": (
        _str("MAAS_ARTIFACT_KEY_FILE", None),
        "File holding a 32-byte key (raw, hex or base64): artifacts are stored encrypted with AES-256-GCM.",
    ),
    "MAAS_ARTIFACTS_URL": (
        _str("MAAS_ARTIFACTS_URL", None),
        "Where artifacts are stored: a folder (a path or file:///path; default $MAAS_HOME/artifacts) or "
        "s3://BUCKET/PREFIX, an S3-compatible store reached with boto3's settings (AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); loads use verified copies in "
        "$MAAS_HOME/cache/s3.",
    ),
    "MAAS_S3_MULTIPART_THRESHOLD_MB": (
        _num("MAAS_S3_MULTIPART_THRESHOLD_MB", 64.0),
        "Artifacts larger than this go to an s3:// MAAS_ARTIFACTS_URL as a multipart upload, in parts of this size "
        "(at least 5), four at a time.",
    ),
    "MAAS_S3_PART_DELAY_S": (
        _num("MAAS_S3_PART_DELAY_S", 0.0),
        "Test hook, unset in normal use: seconds each multipart upload part waits once sent (to kill an upload "
        "midway).",
    ),
    "MAAS_DEVICE": (
        _str("MAAS_DEVICE", "cpu"),
        "Where runtimes execute: cpu, cuda (used when a CUDA provider is available) or auto.",
    ),
    "MAAS_USER": (
        _str("MAAS_USER", None),
        "Name recorded as creator and alias mover; default: the operating-system user.",
    ),
    "MAAS_LOG_LEVEL": (
        _str("MAAS_LOG_LEVEL", None),
        "Log level of maas' own messages (debug, info, warning, error); "
        "default: info for `maas serve`, warning otherwise.",
    ),
    "MAAS_PS_SLOW_WORKER": (
        _str("MAAS_PS_SLOW_WORKER", None),
        "Test hook, unset in normal use: RANK:SECONDS makes that parameter_server worker sleep SECONDS every step.",
    ),
}


def given() -> dict[str, str]:
    """The ``MAAS_*`` settings set in this process's environment, as strings: what a process started elsewhere (a Ray
    Serve replica) needs to see the same registry and settings."""
    return {name: os.environ[name] for name in environment_variables if os.environ.get(name)}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name][0]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
