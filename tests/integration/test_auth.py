"""API keys on every surface of a real server with auth required: REST (Open Inference Protocol), gRPC, the
OpenAI-compatible API, /metrics and /docs. Deny by default: a key sees only its models (others read as missing),
a monitor key reads only /metrics and health, and a revoked key fails within MAAS_AUTH_CACHE_S."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from maas.access.keys import KeyStore, database_of
from maas.registry import Registry
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer
from tests.llm_fixtures import write_tiny_llm_dir

MISSING = "is not registered"


def _keys(home: Path) -> KeyStore:
    return KeyStore(database_of(Registry(home=home)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, dict[str, str], Path]]:
    """A server requiring keys over `alpha` and `beta` (tensors) and `chat` (a tiny language model), with a key of
    each role: consumer (alpha and chat), publisher (beta), monitor, admin."""
    home = tmp_path_factory.mktemp("auth-home")
    models = tmp_path_factory.mktemp("auth-models")
    reg = Registry(home=home)
    reg.register(make_linear_model(models / "alpha.onnx"), "alpha")
    reg.register(make_linear_model(models / "beta.onnx", seed=1), "beta")
    reg.register(write_tiny_llm_dir(models / "tiny"), "chat", format="causal_lm")
    # A version whose lineage names a model the consumer may not see.
    reg.register(
        make_linear_model(models / "alpha2.onnx", seed=2), "alpha", parent="models:/beta/1",
        lineage_extra={"teacher": "models:/beta/1", "recipe": "distill"},
    )  # fmt: skip
    keys = _keys(home)
    tokens = {
        "consumer": keys.create("app", "consumer", models=["alpha", "ch*"])[1],
        "publisher": keys.create("team", "publisher", models=["beta"])[1],
        "monitor": keys.create("prometheus", "monitor")[1],
        "admin": keys.create("ops", "admin")[1],
    }
    # Every test client is 127.0.0.1: the failure throttle is tested on a server of its own.
    with RemoteServer(home, env={"MAAS_AUTH": "required", "MAAS_AUTH_MAX_FAILURES": "100000"}) as srv:
        yield srv, tokens, home


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _g(token: str) -> dict[str, str]:
    """gRPC metadata: keys are lowercase."""
    return {"authorization": f"Bearer {token}"}


INFER = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
SURFACES = [
    ("GET", "/v2"),
    ("GET", "/v2/models/alpha"),
    ("GET", "/v2/models/alpha/ready"),
    ("GET", "/v2/models/alpha/config"),
    ("GET", "/v2/models/alpha/versions/1"),
    ("POST", "/v2/models/alpha/infer"),
    ("POST", "/v2/models/alpha/versions/1/infer"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/chat"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
]


Served = tuple[RemoteServer, dict[str, str], Path]


@pytest.mark.parametrize("credentials", [None, "Bearer nope", "Basic YWRtaW46YWRtaW4=", "Bearer maas_" + "0" * 60])
def test_nothing_is_reached_without_a_valid_key(server: Served, credentials: str | None) -> None:
    srv = server[0]
    headers = {"Authorization": credentials} if credentials else {}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for method, path in SURFACES:
            body = INFER if "infer" in path else {"model": "chat", "messages": [], "prompt": "x", "input": "x"}
            r = c.request(method, path, headers=headers, json=body if method == "POST" else None)
            assert r.status_code in (401, 429), (method, path, r.status_code, r.text)
            if r.status_code == 401:
                assert r.headers["www-authenticate"].startswith("Bearer")
            assert "alpha" not in r.text and "beta" not in r.text
        # Probes stay open.
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200


def test_openai_errors_keep_openai_shape(server: tuple[RemoteServer, dict[str, str], Path]) -> None:
    client = openai.OpenAI(base_url=f"{server[0].url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401
    assert info.value.body["type"] == "authentication_error"  # type: ignore[index]


def test_a_consumer_sees_only_its_models(server: tuple[RemoteServer, dict[str, str], Path]) -> None:
    srv, tokens, _ = server
    token = tokens["consumer"]
    with httpx.Client(base_url=srv.url, timeout=30, headers=_h(token)) as c:
        assert c.post("/v2/models/alpha/infer", json=INFER).status_code == 200
        hidden = c.post("/v2/models/beta/infer", json=INFER)
        absent = c.post("/v2/models/gamma/infer", json=INFER)
        assert hidden.status_code == absent.status_code == 404
        assert hidden.json()["error"].replace("beta", "?") == absent.json()["error"].replace("gamma", "?")
        for path in ("/v2/models/beta", "/v2/models/beta/ready", "/v2/models/beta/config"):
            r = c.get(path)
            assert r.status_code == 404 and MISSING in r.text, path
        assert c.get("/metrics").status_code == 403
        assert c.get("/docs").status_code == 200
    # The real clients, with the key as their header.
    http = httpclient.InferenceServerClient(srv.address)
    x = httpclient.InferInput("x", [2, 4], "FP32")
    x.set_data_from_numpy(np.ones((2, 4), np.float32))
    assert http.infer("alpha", [x], headers=_h(token)).as_numpy("y").shape == (2, 2)
    with pytest.raises(InferenceServerException, match=MISSING):
        http.infer("beta", [x], headers=_h(token))
    with pytest.raises(InferenceServerException):
        http.infer("alpha", [x])
    with grpcclient.InferenceServerClient(srv.grpc_address) as g:
        gx = grpcclient.InferInput("x", [2, 4], "FP32")
        gx.set_data_from_numpy(np.ones((2, 4), np.float32))
        assert g.infer("alpha", [gx], headers=_g(token)).as_numpy("y").shape == (2, 2)
        assert g.get_model_metadata("alpha", headers=_g(token)).name == "alpha"
        for call in (
            lambda: g.infer("alpha", [gx]),
            lambda: g.get_model_metadata("alpha"),
            lambda: g.get_server_metadata(),
            lambda: g.infer("alpha", [gx], headers=_g("maas_bad")),
        ):
            with pytest.raises(InferenceServerException, match=r"UNAUTHENTICATED|API key"):
                call()
        with pytest.raises(InferenceServerException, match=MISSING):
            g.infer("beta", [gx], headers=_g(token))
        with pytest.raises(InferenceServerException, match=MISSING):
            g.is_model_ready("beta", headers=_g(token))
        assert g.is_server_live() and g.is_server_ready()  # probes stay open


def test_the_openai_client_with_a_key(server: tuple[RemoteServer, dict[str, str], Path]) -> None:
    srv, tokens, _ = server
    consumer = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=tokens["consumer"], max_retries=0)
    assert [m.id for m in consumer.models.list()] == ["chat"]
    reply = consumer.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    publisher = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=tokens["publisher"], max_retries=0)
    assert [m.id for m in publisher.models.list()] == []
    with pytest.raises(openai.NotFoundError):
        publisher.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    admin = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=tokens["admin"], max_retries=0)
    assert [m.id for m in admin.models.list()] == ["chat"]


def test_a_monitor_reads_metrics_and_nothing_else(server: tuple[RemoteServer, dict[str, str], Path]) -> None:
    srv, tokens, _ = server
    with httpx.Client(base_url=srv.url, timeout=30, headers=_h(tokens["monitor"])) as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and "maas_" in r.text
        assert c.post("/v2/models/alpha/infer", json=INFER).status_code == 404
        assert c.get("/v2/models/alpha").status_code == 404
        assert c.get("/v1/models").json()["data"] == []
    with httpx.Client(base_url=srv.url, timeout=30, headers=_h(tokens["admin"])) as c:
        assert c.get("/metrics").status_code == 200
        assert c.post("/v2/models/beta/infer", json=INFER).status_code == 200


@pytest.mark.slow
def test_a_revoked_key_fails_within_two_seconds_on_every_worker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Registry(home=home).register(make_linear_model(tmp_path / "alpha.onnx"), "alpha")
    env = {"MAAS_AUTH": "required", "MAAS_HOME": str(home)}
    made = subprocess.run(
        [sys.executable, "-m", "maas", "keys", "create", "--name", "app", "--role", "consumer", "--models", "*",
         "--json"],
        env={**__import__("os").environ, **env}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = json.loads(made.stdout)
    with (
        RemoteServer(home, args=["--workers", "2"], env=env) as srv,
        httpx.Client(base_url=srv.url, timeout=30, headers=_h(key["key"])) as c,
    ):
        # New connections land on either worker: both know the key.
        for _ in range(20):
            assert httpx.post(f"{srv.url}/v2/models/alpha/infer", json=INFER, headers=_h(key["key"])).status_code == 200
        subprocess.run(
                [sys.executable, "-m", "maas", "keys", "revoke", key["id"]],
                env={**__import__("os").environ, **env}, check=True, capture_output=True,
            )  # fmt: skip
        revoked_at = time.monotonic()
        time.sleep(2.0 - 0.3)  # MAAS_AUTH_CACHE_S (1 s) plus room; from 2 s after revoking, nothing gets in
        while time.monotonic() - revoked_at < 2.0:
            time.sleep(0.05)
        statuses = {httpx.post(f"{srv.url}/v2/models/alpha/infer", json=INFER, headers=_h(key["key"])).status_code
                        for _ in range(30)}  # fmt: skip
        statuses.add(c.post("/v2/models/alpha/infer", json=INFER).status_code)  # a kept-alive connection too
        assert statuses <= {401, 429}, statuses


def test_failed_attempts_are_slowed_per_address(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Registry(home=home).register(make_linear_model(tmp_path / "alpha.onnx"), "alpha")
    _, token = _keys(home).create("app", "consumer", models=["alpha"])
    with (
        RemoteServer(home, env={"MAAS_AUTH": "required", "MAAS_AUTH_MAX_FAILURES": "5"}) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):
        codes = [c.get("/v2/models/alpha", headers=_h(f"maas_guess{i}")).status_code for i in range(5)]
        assert codes == [401] * 5
        started = time.monotonic()
        r = c.get("/v2/models/alpha", headers=_h("maas_guess"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 1
        assert time.monotonic() - started >= 1.0  # slowed, not only refused
        # A valid key from the same address still gets in: guessing locks no honest user out.
        assert c.get("/v2/models/alpha", headers=_h(token)).status_code == 200


def test_the_servers_access_settings_are_audited(server: Served) -> None:
    from maas.registry.audit import AuditLog

    entries = [e for e in AuditLog(database_of(Registry(home=server[2]))).list() if e.action == "auth.settings"]
    assert len(entries) == 1 and entries[0].target == f"server:127.0.0.1:{server[0].port}"
    assert entries[0].after["keys_required"] is True and entries[0].after["auth"] == "required"


def test_lineage_names_no_model_the_key_may_not_see(server: Served) -> None:
    srv, tokens, _ = server
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        shown = c.get("/admin/v1/models/alpha/versions/2", headers=_h(tokens["consumer"])).json()
        assert shown["lineage"]["parent"] is None and shown["lineage"]["extra"] == {"recipe": "distill"}
        assert "beta" not in c.get("/admin/v1/models/alpha", headers=_h(tokens["consumer"])).text
        full = c.get("/admin/v1/models/alpha/versions/2", headers=_h(tokens["admin"])).json()
        assert full["lineage"]["parent"] == "models:/beta/1"


def test_language_models_on_the_tensor_protocol_are_metered_in_tokens(server: Served) -> None:
    from maas.access.usage import UsageStore

    srv, tokens, home = server
    prompts = {"name": "text_input", "shape": [2], "datatype": "BYTES", "data": ["hello there", "one two three"]}
    with httpx.Client(base_url=srv.url, timeout=120, headers=_h(tokens["consumer"])) as c:
        r = c.post("/v2/models/chat/infer", json={"inputs": [prompts]})
        assert r.status_code == 200, r.text
        many = {**prompts, "shape": [17], "data": ["hi"] * 17}
        r = c.post("/v2/models/chat/infer", json={"inputs": [many]})
        assert r.status_code == 400 and "at most 16" in r.text
    consumer = _keys(home).list()[0].id
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # usage is written every 0.5 s
        rows = [t for t in UsageStore(database_of(Registry(home=home))).query(key_id=consumer, by="total")
                if t.model == "chat"]  # fmt: skip
        if rows and rows[0].prompt_tokens:
            break
        time.sleep(0.2)
    assert rows and rows[0].prompt_tokens >= 4 and rows[0].completion_tokens >= 2, rows


def test_a_keyless_loopback_server_refuses_what_a_web_page_sends(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Registry(home=home).register(make_linear_model(tmp_path / "alpha.onnx"), "alpha")
    with RemoteServer(home) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/v2/models/alpha/infer", json=INFER).status_code == 200  # programs are not affected
        assert c.get("/admin/v1/models").status_code == 200
        page = c.post("/admin/v1/models/alpha/aliases/production/rollback", headers={"Origin": "https://evil.example"})
        assert page.status_code == 403 and "web page" in page.text
        assert c.post("/v2/models/alpha/infer", json=INFER, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        rebound = c.get("/admin/v1/models", headers={"Host": "evil.example:8000"})
        assert rebound.status_code == 403 and "localhost" in rebound.text
        assert c.get("/admin/v1/models", headers={"Origin": f"http://127.0.0.1:{srv.port}"}).status_code == 200
        assert c.get("/v2/health/ready", headers={"Host": "evil.example"}).status_code == 200  # probes stay open
