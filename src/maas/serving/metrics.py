"""Prometheus metrics of one server, on a registry of its own (so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from maas.errors import MaasError

#: Label used for requests naming a model the server does not serve, so unknown names cannot blow up
#: the number of series.
UNKNOWN = "_unknown_"

# The *_created series double the output for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
            registry=self.registry,
        )
        self.load_failures = Counter(
            "maas_model_load_failures", "Failed loads of a model version.", ["model", "version"], registry=self.registry
        )
        self.loaded = Gauge("maas_loaded_models", "Model versions loaded in memory.", registry=self.registry)
        self.serving = Gauge(
            "maas_model_serving_version",
            "The version a bare model name is served at right now.",
            ["model"],
            registry=self.registry,
        )

    def observe_request(self, model: str, version: str, seconds: float, exc: BaseException | None) -> None:
        """``model`` must be a name the server knows (or :data:`UNKNOWN`): never raw request input."""
        self.requests.labels(model, version, outcome_of(exc)).inc()
        if exc is None:
            self.latency.labels(model, version).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
