"""The admin API (/admin/v1) of a real server with auth required, through httpx: every endpoint needs a key; a key
sees only the models its patterns match (others read as missing), changes them only as a publisher or admin, and
only an admin reaches keys and the audit log; bodies that are malformed, too large, cut off or not what their
sha256 says register nothing and answer 4xx."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from maas.access.keys import KeyStore, database_of
from maas.registry import Registry
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer

LIMIT = 256 * 1024  # MAAS_MAX_REQUEST_BYTES of the server: uploads past it are refused
MISSING = "is not registered"
JSON = {"content-type": "application/json"}


class Server:
    def __init__(self, srv: RemoteServer, tokens: dict[str, str], ids: dict[str, str], model: Path) -> None:
        self.srv, self.tokens, self.ids, self.model = srv, tokens, ids, model

    def client(self, role: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.srv.url + "/admin/v1", headers=headers, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`digits` (two versions, production → 1) and `secret`; a key of each role, the others limited to digits*."""
    home = tmp_path_factory.mktemp("admin-home")
    model = make_linear_model(tmp_path_factory.mktemp("admin-models") / "linear.onnx")
    reg = Registry(home=home)
    reg.register(model, "digits", alias="production")
    reg.register(model, "digits")
    reg.register(model, "secret")
    keys = KeyStore(database_of(reg))
    made = {
        "admin": keys.create("ops", "admin"),
        "publisher": keys.create("team", "publisher", models=["digits*"]),
        "consumer": keys.create("app", "consumer", models=["digits*"]),
        "monitor": keys.create("prometheus", "monitor"),
    }
    env = {
        "MAAS_AUTH": "required",
        "MAAS_AUTH_MAX_FAILURES": "100000",  # every client here is 127.0.0.1
        "MAAS_AUTH_CACHE_S": "0",
        "MAAS_MAX_REQUEST_BYTES": str(LIMIT),
    }
    with RemoteServer(home, env=env) as srv:
        yield Server(srv, {r: t for r, (_, t) in made.items()}, {r: k.id for r, (k, _) in made.items()}, model)


#: Every admin endpoint, on `digits` where it names a model.
ENDPOINTS = [
    ("GET", "/models"),
    ("GET", "/models/digits"),
    ("GET", "/models/digits/resolve"),
    ("POST", "/models/digits/versions"),
    ("GET", "/models/digits/versions/1"),
    ("DELETE", "/models/digits/versions/1"),
    ("GET", "/models/digits/aliases/production"),
    ("PUT", "/models/digits/aliases/production"),
    ("DELETE", "/models/digits/aliases/production"),
    ("POST", "/models/digits/aliases/production/rollback"),
    ("GET", "/models/digits/alias-history"),
    ("GET", "/deployments"),
    ("GET", "/deployments/digits"),
    ("PUT", "/deployments/digits"),
    ("DELETE", "/deployments/digits"),
    ("GET", "/keys"),
    ("POST", "/keys"),
    ("GET", "/keys/000000000000"),
    ("POST", "/keys/000000000000/revoke"),
    ("POST", "/keys/000000000000/rotate"),
    ("GET", "/audit"),
    ("GET", "/audit/verify"),
    ("GET", "/usage"),
]
#: What changes `digits` (each answered 403 to a key that may only read it).
MUTATIONS = [
    ("POST", "/models/digits/versions", {"content": b"x"}),
    ("PUT", "/models/digits/aliases/staging", {"json": {"version": 1}}),
    ("DELETE", "/models/digits/aliases/production", {}),
    ("POST", "/models/digits/aliases/production/rollback", {}),
    ("DELETE", "/models/digits/versions/2", {}),
    ("PUT", "/deployments/digits", {"json": {"settings": {"max_batch_size": 4}}}),
    ("DELETE", "/deployments/digits", {}),
]
#: What reads `digits` (a model a key sees).
READS = [
    "/models/digits",
    "/models/digits/resolve",
    "/models/digits/versions/1",
    "/models/digits/aliases/production",
    "/models/digits/alias-history",
    "/deployments/digits",
]


def _versions(server: Server, name: str = "digits") -> list[int]:
    with server.client("admin") as c:
        return [v["version"] for v in c.get(f"/models/{name}").json()["versions"]]


@pytest.mark.parametrize("credentials", [None, "Bearer nope", "Bearer maas_" + "0" * 60])
def test_every_endpoint_needs_a_valid_key(server: Server, credentials: str | None) -> None:
    headers = {"Authorization": credentials} if credentials else {}
    with httpx.Client(base_url=server.srv.url + "/admin/v1", headers=headers, timeout=30) as c:
        for method, path in ENDPOINTS:
            r = c.request(method, path, json={"version": 1} if method in ("PUT", "POST") else None)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert "digits" not in r.text
    assert _versions(server) == [1, 2]


def test_a_consumer_reads_its_models_and_changes_nothing(server: Server) -> None:
    with server.client("consumer") as c:
        names = [m["name"] for m in c.get("/models").json()["models"]]
        assert "digits" in names and "secret" not in names
        for path in READS:
            assert c.get(path).status_code == 200, path
            hidden = c.get(path.replace("digits", "secret"))
            absent = c.get(path.replace("digits", "nothing"))
            assert hidden.status_code == absent.status_code == 404, path
            assert MISSING in hidden.text and hidden.text.replace("secret", "?") == absent.text.replace("nothing", "?")
        for method, path, body in MUTATIONS:
            r = c.request(method, path, **body)  # type: ignore[arg-type]
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            other = c.request(method, path.replace("digits", "secret"), **body)  # type: ignore[arg-type]
            want = 403 if path.endswith("/versions") else 404  # registering names no existing model
            assert other.status_code == want, (method, path, other.text)
        for method, path in ENDPOINTS:
            if path.startswith(("/keys", "/audit")):
                assert c.request(method, path, json={}).status_code == 403, path
    assert _versions(server) == [1, 2]


def test_a_monitor_key_sees_no_model(server: Server) -> None:
    with server.client("monitor") as c:
        assert c.get("/models").json() == {"models": []}
        for path in READS:
            assert c.get(path).status_code == 404, path
        for method, path, body in MUTATIONS:
            want = 403 if path.endswith("/versions") else 404
            assert c.request(method, path, **body).status_code == want, (method, path)  # type: ignore[arg-type]
        assert c.get("/keys").status_code == c.get("/audit").status_code == 403


def test_usage_is_a_keys_own_unless_it_is_an_admins(server: Server) -> None:
    with server.client("consumer") as c:
        own = c.get("/usage", params={"by": "total"})
        assert own.status_code == 200 and all(t["key_id"] == server.ids["consumer"] for t in own.json()["usage"])
        assert c.get("/usage", params={"key": server.ids["admin"]}).status_code == 403
        assert c.get("/usage", params={"by": "week"}).status_code == 400
    with server.client("admin") as c:
        assert c.get("/usage", params={"key": server.ids["consumer"], "since": "1h"}).status_code == 200


def _upload(c: httpx.Client, name: str, data: bytes, **query: str) -> httpx.Response:
    headers = {"X-Maas-Sha256": hashlib.sha256(data).hexdigest()}
    return c.post(
        f"/models/{name}/versions", params={"filename": "linear.onnx", **query}, content=data, headers=headers
    )


def test_a_publisher_manages_its_models_and_is_audited(server: Server) -> None:
    data = server.model.read_bytes()
    with server.client("publisher") as c:
        r = _upload(c, "digits-b", data, alias="staging", description="remote", tag="team=vision", metric="acc=0.5")
        assert r.status_code == 201, r.text
        mv = r.json()
        assert (mv["uri"], mv["format"], mv["aliases"], mv["tags"], mv["metrics"]) == (
            "models:/digits-b/1",
            "onnx",
            ["staging"],
            {"team": "vision"},
            {"acc": 0.5},
        )
        assert mv["artifact_digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert mv["lineage"]["creator"] == f"key:{server.ids['publisher']}"
        assert _upload(c, "digits-b", data, parent="models:/digits-b/1").json()["lineage"]["parent"] == (
            "models:/digits-b/1"
        )
        assert _upload(c, "digits-b", data, parent="models:/secret/1").status_code == 404  # a parent it cannot see

        moved = c.put("/models/digits-b/aliases/staging", json={"version": 2}).json()
        assert (moved["from_version"], moved["to_version"], moved["actor"]) == (1, 2, f"key:{server.ids['publisher']}")
        assert c.get("/models/digits-b/aliases/staging").json()["version"] == 2
        assert c.post("/models/digits-b/aliases/staging/rollback").json()["to_version"] == 1
        history = c.get("/models/digits-b/alias-history", params={"alias": "staging"}).json()["events"]
        assert [e["action"] for e in history] == ["set", "set", "rollback"]

        deployed = c.put("/deployments/digits-b", json={"settings": {"max_batch_size": 8}}).json()
        assert (deployed["max_batch_size"], deployed["revision"], deployed["changed"]) == (8, 1, ["max_batch_size"])
        assert c.get("/deployments/digits-b").json()["max_batch_size"] == 8
        assert c.delete("/deployments/digits-b").json() == {"name": "digits-b", "deleted": True}

        assert c.delete("/models/digits-b/versions/1").status_code == 409  # staging points at it
        assert c.delete("/models/digits-b/versions/1", params={"force": "true"}).json()["version"] == 1
        assert c.delete("/models/digits-b/aliases/staging").status_code == 404  # went with version 1
        assert _upload(c, "secret", data).status_code == 403
        assert c.put("/models/secret/aliases/x", json={"version": 1}).status_code == 404
        assert c.get("/keys").status_code == c.get("/audit").status_code == 403

    with server.client("admin") as c:
        entries = c.get("/audit", params={"actor": f"key:{server.ids['publisher']}"}).json()["entries"]
        assert entries and all(e["client"] == "127.0.0.1" and e["request_id"] for e in entries)
        actions = [(e["action"], e["target"]) for e in entries]
        assert ("model.register", "models:/digits-b/1") in actions
        assert ("alias.rollback", "models:/digits-b@staging") in actions
        assert c.get("/audit/verify").json()["ok"] is True


def test_an_admin_manages_keys(server: Server) -> None:
    with server.client("admin") as c:
        made = c.post("/keys", json={"name": "ci", "role": "consumer", "models": ["digits"], "limits": {"rpm": 60}})
        assert made.status_code == 201, made.text
        key = made.json()
        assert (key["role"], key["models"], key["limits"], key["created_by"]) == (
            "consumer",
            ["digits"],
            {"rpm": 60},
            f"key:{server.ids['admin']}",
        )
        assert key["id"] in [k["id"] for k in c.get("/keys").json()["keys"]]
        assert "key" not in c.get(f"/keys/{key['id']}").json()
        rotated = c.post(f"/keys/{key['id']}/rotate").json()
        assert rotated["key"] != key["key"] and rotated["rotated_at"]

    def models_with(token: str) -> int:
        with httpx.Client(base_url=server.srv.url, headers={"Authorization": f"Bearer {token}"}) as c:
            return c.get("/admin/v1/models").status_code

    assert models_with(key["key"]) == 401 and models_with(rotated["key"]) == 200
    with server.client("admin") as c:
        assert c.post(f"/keys/{key['id']}/revoke").json()["state"] == "revoked"
    assert models_with(rotated["key"]) == 401


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        (
            "PUT",
            "/models/digits/aliases/x",
            {"content": b"{not json", "headers": JSON},
            400,
        ),
        ("PUT", "/models/digits/aliases/x", {"content": b"version=1", "headers": {"content-type": "text/plain"}}, 415),
        ("PUT", "/models/digits/aliases/x", {"json": {"version": "one"}}, 400),
        ("PUT", "/models/digits/aliases/x", {"json": {"version": 1, "extra": True}}, 400),
        ("PUT", "/models/digits/aliases/x", {"json": [1, 2]}, 400),
        ("PUT", "/models/digits/aliases/x", {"json": {"version": 1, "pad": "x" * 70_000}}, 413),
        ("PUT", "/models/digits/aliases/Bad!", {"json": {"version": 1}}, 400),
        ("PUT", "/models/digits/aliases/latest", {"json": {"version": 1}}, 400),
        ("GET", "/models/digits/versions/abc", {}, 400),
        ("GET", "/models/digits/versions/99999999999", {}, 400),
        ("GET", "/models/..%2Fetc", {}, 404),
        ("GET", "/models/-x", {}, 400),
        ("PUT", "/deployments/digits", {"json": {"settings": {"name": "x", "reset": True}}}, 400),
        ("PUT", "/deployments/digits", {"json": {"settings": {"max_batch_size": 10**9}}}, 400),
        ("POST", "/keys", {"json": {"name": "x", "role": "root"}}, 400),
        ("POST", "/keys", {"json": {"name": "x", "role": "consumer"}}, 400),  # no patterns
        ("POST", "/keys", {"json": {"name": "x", "role": "admin", "limits": {"rpm": -1}}}, 400),
        ("POST", "/keys", {"json": {"name": "x", "role": "admin", "expires": "soon"}}, 400),
        ("POST", "/keys/not-an-id/revoke", {}, 400),
        ("POST", "/keys", {"json": {"name": "x", "role": "admin", "expires": "999999w"}}, 400),
        ("POST", "/keys", {"json": {"name": "x", "role": "admin", "limits": {"rpm": 10**30}}}, 400),
        ("GET", "/audit", {"params": {"since": "yesterday"}}, 400),
        ("GET", "/audit", {"params": {"since": "9999999w"}}, 400),
        ("GET", "/usage", {"params": {"until": "0001-01-01T00:00:00+05:00"}}, 400),
        ("POST", "/models/digits/versions", {"content": b""}, 400),
        ("POST", "/models/digits/versions", {"content": b"not a model at all"}, 400),
        ("POST", "/models/digits/versions", {"content": b"\x08" * (LIMIT + 1)}, 413),  # by its Content-Length
        ("POST", "/models/digits/versions", {"content": iter([b"\x08" * (LIMIT // 4)] * 4 + [b"\x08"])}, 413),
        ("POST", "/models/digits/versions", {"content": b"x", "headers": {"x-maas-sha256": "abc"}}, 400),
        ("POST", "/models/digits/versions", {"content": b"x", "params": {"tag": "novalue"}}, 400),
        ("POST", "/models/digits/versions", {"content": b"x", "params": {"alias": "Bad!"}}, 400),
    ],
)
def test_bad_requests_are_4xx_and_change_nothing(
    server: Server, method: str, path: str, kwargs: dict[str, object], status: int
) -> None:
    with server.client("admin") as c:
        r = c.request(method, path, **kwargs)  # type: ignore[arg-type]
        assert r.status_code == status, r.text
        assert isinstance(r.json()["error"], str)
    assert _versions(server) == [1, 2] and server.srv.alive()


def test_an_upload_whose_sha256_differs_registers_nothing(server: Server) -> None:
    data = server.model.read_bytes()
    with server.client("publisher") as c:
        r = c.post(
            "/models/digits-sha/versions",
            params={"filename": "linear.onnx"},
            content=data,
            headers={"X-Maas-Sha256": hashlib.sha256(data + b"!").hexdigest()},
        )
        assert r.status_code == 400 and "sha256" in r.json()["error"]
        assert c.get("/models/digits-sha").status_code == 404
        assert c.get("/models/digits-sha/versions/1").status_code == 404


def test_an_upload_cut_off_midway_registers_nothing(server: Server) -> None:
    data = server.model.read_bytes()
    head = (
        "POST /admin/v1/models/digits-cut/versions?filename=linear.onnx HTTP/1.1\r\n"
        f"Host: {server.srv.address}\r\nAuthorization: Bearer {server.tokens['publisher']}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(data) + 100_000}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.srv.port)) as sock:
        sock.sendall(head.encode() + data)
        time.sleep(0.3)  # the server is reading the body
    tmp = server.srv.home / "artifacts" / "tmp"
    deadline = time.monotonic() + 10
    while tmp.is_dir() and any(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (tmp.is_dir() and any(tmp.iterdir())), list(tmp.iterdir())  # its scratch folder is gone
    with server.client("publisher") as c:
        assert c.get("/models/digits-cut").status_code == 404
    assert server.srv.alive() and "Traceback" not in server.srv.log()
