"""Prometheus metrics of one server, on a registry of its own (so tests can run several apps).

Under ``maas serve --workers N`` every worker process writes its values to files in one directory
(prometheus_client's multiprocess mode: its supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before they start),
and :meth:`ServerMetrics.render` adds up all of them, so any worker answers ``/metrics`` for the whole server.
Each gauge says how its workers' values combine (``multiprocess_mode``); a series a worker removes (a model no
longer served) stays at its last value there until the server restarts: prometheus_client cannot remove it.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from maas.errors import MaasError

#: Label used for requests naming a model the server does not serve, so unknown names cannot blow up
#: the number of series.
UNKNOWN = "_unknown_"

# The *_created series double the output for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]

TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def multiprocess_mode() -> bool:
    """Whether metric values go to files shared by worker processes (decided when prometheus_client was first
    imported, from ``PROMETHEUS_MULTIPROC_DIR``)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "success"
    if isinstance(exc, MaasError):
        if exc.http_status == 503:
            return "unavailable"
        if 400 <= exc.http_status < 500:
            return "client_error"
    return "server_error"


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "maas_inference_requests",
            "Inference requests by model, version and outcome.",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "maas_inference_request_duration_seconds",
            "Time from request received to response ready, by model and version.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.load_seconds = Gauge(
            "maas_model_load_seconds",
            "How long the last load of a model version took (artifact check plus runtime start).",
            ["model", "version"],
            multiprocess_mode="mostrecent",
            registry=self.registry,
        )
        self.load_failures = Counter(
            "maas_model_load_failures", "Failed loads of a model version.", ["model", "version"], registry=self.registry
        )
        self.loaded = Gauge(
            "maas_loaded_models",
            "Model versions loaded in memory (summed over worker processes: each loads its own).",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.serving = Gauge(
            "maas_model_serving_version",
            "The version a bare model name is served at right now.",
            ["model"],
            multiprocess_mode="livemostrecent",  # the latest switch of any worker: right after a rollback too
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "maas_batch_size",
            "Rows in each model call (dynamic batching puts several requests in one).",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "maas_queue_depth",
            "Requests waiting to run, by model and version.",
            ["model", "version"],
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.llm = LLMMetrics(self.registry)
        self.keys = KeyMetrics(self.registry)
        # What /metrics shows: this registry, or the files of all worker processes.
        self.exposed = self.registry
        if multiprocess_mode():
            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed)  # type: ignore[no-untyped-call]

    def observe_request(self, model: str, version: str, seconds: float, exc: BaseException | None) -> None:
        """``model`` must be a name the server knows (or :data:`UNKNOWN`): never raw request input."""
        self.requests.labels(model, version, outcome_of(exc)).inc()
        if exc is None:
            self.latency.labels(model, version).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.exposed)


class LLMMetrics:
    """Language models: tokens, time to first token, time between tokens, finished, running and waiting requests."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.tokens = Counter(
            "maas_llm_tokens",
            "Tokens processed by language models: kind=prompt (prefilled) or completion (generated), counted as "
            "they happen, abandoned streams included.",
            [*labels, "kind"],
            registry=registry,
        )
        self.first_token = Histogram(
            "maas_llm_time_to_first_token_seconds",
            "From a generation request's arrival at the engine to its first token.",
            labels,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "maas_llm_inter_token_seconds",
            "Between two tokens of one generation.",
            labels,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "maas_llm_requests",
            "Finished generations by reason: stop, length, cancelled (the client left or a stop string matched), "
            "error.",
            [*labels, "reason"],
            registry=registry,
        )
        self.running = Gauge(
            "maas_llm_running",
            "Sequences in the running batch.",
            labels,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.queued = Gauge(
            "maas_llm_queued",
            "Generation requests waiting to join the batch.",
            labels,
            multiprocess_mode="livesum",
            registry=registry,
        )

    def observer(self, model: str, version: str) -> LLMObserver:
        return LLMObserver(self, model, version)


class LLMObserver:
    """One model version's view of :class:`LLMMetrics`, as the generation engine reports to it."""

    def __init__(self, metrics: LLMMetrics, model: str, version: str) -> None:
        self._prompt = metrics.tokens.labels(model, version, "prompt")
        self._completion = metrics.tokens.labels(model, version, "completion")
        self._first = metrics.first_token.labels(model, version)
        self._inter = metrics.inter_token.labels(model, version)
        self._finished = metrics.finished
        self._labels = (model, version)
        self._running = metrics.running.labels(model, version)
        self._queued = metrics.queued.labels(model, version)

    def tokens(self, prompt: int, completion: int) -> None:
        if prompt:
            self._prompt.inc(prompt)
        if completion:
            self._completion.inc(completion)

    def first_token(self, seconds: float) -> None:
        self._first.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._inter.observe(seconds)

    def finished(self, reason: str) -> None:
        self._finished.labels(*self._labels, reason).inc()

    def load(self, running: int, queued: int) -> None:
        self._running.set(running)
        self._queued.set(queued)


class KeyMetrics:
    """Per API key: requests, errors, tokens and refusals, labelled by key id (``-`` with auth off) and model (``-``
    for a request that named none). Keys and models are made by admins and publishers, so the label sets are few;
    past :data:`MAX_SERIES` pairs in one process, further ones are counted under ``other``."""

    MAX_SERIES = 1000
    OTHER = "other"

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["key", "model"]
        self.requests = Counter("maas_key_requests", "Requests by API key and model.", labels, registry=registry)
        self.errors = Counter(
            "maas_key_errors", "Requests answered with an error, by API key and model.", labels, registry=registry
        )
        self.tokens = Counter(
            "maas_key_tokens",
            "Tokens by API key and model: kind=prompt or completion (abandoned streams: what was generated).",
            [*labels, "kind"],
            registry=registry,
        )
        self.limited = Counter(
            "maas_key_rate_limited",
            "Requests refused (429) by a key's rate limit or quota: limit=rpm, tpm, concurrent, requests_per_day or "
            "tokens_per_month.",
            ["key", "limit"],
            registry=registry,
        )
        self._seen: set[tuple[str, str]] = set()
        self._refused_keys: set[str] = set()

    def _labels(self, key: str, model: str) -> tuple[str, str]:
        pair = (key, model)
        if pair in self._seen:
            return pair
        if len(self._seen) >= self.MAX_SERIES:
            return self.OTHER, self.OTHER
        self._seen.add(pair)
        return pair

    def observe(self, key: str, model: str, *, error: bool, prompt_tokens: int, completion_tokens: int) -> None:
        """One finished request of ``key`` on ``model`` (both server-known names, never raw request input)."""
        key, model = self._labels(key, model)
        self.requests.labels(key, model).inc()
        if error:
            self.errors.labels(key, model).inc()
        if prompt_tokens:
            self.tokens.labels(key, model, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(key, model, "completion").inc(completion_tokens)

    def refused(self, key: str, limit: str) -> None:
        """A request of ``key`` refused by its ``limit``."""
        if key not in self._refused_keys:
            if len(self._refused_keys) >= self.MAX_SERIES:
                key = self.OTHER
            else:
                self._refused_keys.add(key)
        self.limited.labels(key, limit).inc()
