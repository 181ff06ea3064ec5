"""``maas serve --ssl-certfile/--ssl-keyfile``: REST and gRPC over TLS with a certificate made here (a private CA and
a server certificate for 127.0.0.1 and localhost), with one process and with ``--workers 2``; the real clients
trust the CA and get answers, plain HTTP and untrusting clients get none, and a half-given pair is refused."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import certifi
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.utils import InferenceServerException

from maas import runtimes
from maas.cli.chat_client import ChatClient
from maas.errors import MaasError
from maas.registry import Registry
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer

X = np.arange(8, dtype=np.float32).reshape(2, 4)
ROW = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_key: Path  # a key the certificate was not issued for


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(folder: Path) -> Pki:
    """A CA, and a server certificate it signs for localhost and 127.0.0.1, valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "maas test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "other.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(_pem_key(server_key))
    pki.other_key.write_bytes(_pem_key(ec.generate_private_key(ec.SECP256R1())))
    for path in (pki.key, pki.other_key):
        path.chmod(0o600)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("tls-home")
    Registry(home=home).register(make_linear_model(tmp_path_factory.mktemp("m") / "linear.onnx"), "linear")
    return home


@contextlib.contextmanager
def tls_server(home: Path, pki: Pki, *args: str) -> Iterator[RemoteServer]:
    """``maas serve`` over TLS; its readiness is polled over https, trusting the test CA (SSL_CERT_FILE)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(pki.ca))  # what httpx trusts by default, in RemoteServer's polling
        server = RemoteServer(home, args=["--ssl-certfile", str(pki.cert), "--ssl-keyfile", str(pki.key), *args])
        server.url = f"https://{server.address}"
        with server:
            yield server


@pytest.fixture(scope="module")
def served(home: Path, pki: Pki) -> Iterator[RemoteServer]:
    with tls_server(home, pki) as server:
        yield server


def expected(home: Path) -> np.ndarray:
    reg = Registry(home=home)
    path = reg.artifact_path(reg.resolve("linear"))
    y: np.ndarray = runtimes.load(path, "onnx").infer({"x": X})["y"]
    return y


def trusting(pki: Pki) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=10)


def grpc_infer(server: RemoteServer, **tls: object) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_address, **tls)  # type: ignore[arg-type]
    try:
        inp = grpcclient.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        y: np.ndarray = client.infer("linear", [inp], client_timeout=10).as_numpy("y")
        return y
    finally:
        client.close()


def test_rest_over_tls_with_the_ca_trusted(served: RemoteServer, home: Path, pki: Pki) -> None:
    said = " ".join(served.log().split())
    assert f"https://127.0.0.1:{served.port}" in said and f"grpcs://127.0.0.1:{served.grpc_port}" in said
    with trusting(pki) as client:
        assert client.get(f"https://127.0.0.1:{served.port}/v2/health/ready").status_code == 200
        assert client.get(f"https://localhost:{served.port}/v2/health/ready").status_code == 200
        r = client.post(f"{served.url}/v2/models/linear/infer", json=ROW)
    assert r.status_code == 200, r.text
    y = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(2, -1)
    np.testing.assert_allclose(y, expected(home), rtol=1e-6)


def test_plain_http_and_untrusting_clients_get_nothing(served: RemoteServer, pki: Pki) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{served.address}/v2/health/ready", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{served.url}/v2/health/ready", verify=ssl.create_default_context(cafile=certifi.where()))
    with pytest.raises(InferenceServerException):
        grpc_infer(served)  # plaintext gRPC
    with pytest.raises(InferenceServerException):
        grpc_infer(served, ssl=True, root_certificates=certifi.where())


def test_grpc_over_tls_with_tritonclient(served: RemoteServer, home: Path, pki: Pki) -> None:
    y = grpc_infer(served, ssl=True, root_certificates=str(pki.ca))
    np.testing.assert_allclose(y, expected(home), rtol=1e-6)


def test_chat_client_trusts_maas_ssl_ca_file(
    served: RemoteServer, pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))  # nothing the system trusts by way of the environment
    with pytest.raises(MaasError, match="MAAS_SSL_CA_FILE"):
        ChatClient(served.url).model("linear")
    monkeypatch.setenv("MAAS_SSL_CA_FILE", str(pki.ca))
    with pytest.raises(MaasError, match="answered 404"):  # a TLS connection, then the server's own answer
        ChatClient(served.url).model("no-such-model")


@pytest.mark.slow
def test_workers_serve_tls(home: Path, pki: Pki) -> None:
    with tls_server(home, pki, "--workers", "2") as server:
        deadline = time.monotonic() + 60
        while "with 2 workers" not in (said := " ".join(server.log().split())):  # printed once both are ready
            assert server.alive() and time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert f"https://127.0.0.1:{server.port}" in said
        assert answered_by(server, pki) == {"0", "1"}
        # A worker that replaces a dead one joins the port once ready, on a path of its own: over TLS too.
        before = workers(server)
        before[0].kill()
        while before[0].is_running() and before[0].status() != psutil.STATUS_ZOMBIE:  # its sockets closed
            time.sleep(0.01)
        while not any(f"(pid {p.pid}) ready" in server.log() for p in workers(server) if p not in before):
            assert server.alive() and time.monotonic() < deadline + 60, server.log()
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while answered_by(server, pki) != {"0", "1"}:
            assert time.monotonic() < deadline
        y = grpc_infer(server, ssl=True, root_certificates=str(pki.ca))
        np.testing.assert_allclose(y, expected(home), rtol=1e-6)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{server.address}/v2/health/ready", timeout=5)


def workers(server: RemoteServer) -> list[psutil.Process]:
    assert server.proc is not None
    children: list[psutil.Process] = psutil.Process(server.proc.pid).children()
    return children


def answered_by(server: RemoteServer, pki: Pki, connections: int = 30) -> set[str]:
    """The workers that answer over TLS; a connection each, which the kernel spreads over the workers."""
    seen = set()
    for _ in range(connections):
        with trusting(pki) as client:
            r = client.post(f"{server.url}/v2/models/linear/infer", json=ROW)
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-maas-worker"])
    return seen


def serve(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"MAAS_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "maas", "serve", "--port", "0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_half_or_bad_pairs_are_refused_before_serving(tmp_path: Path, pki: Pki) -> None:
    cases = {
        ("--ssl-certfile", str(pki.cert)): "--ssl-keyfile",
        ("--ssl-keyfile", str(pki.key)): "--ssl-certfile",
        ("--ssl-certfile", str(tmp_path / "absent.pem"), "--ssl-keyfile", str(pki.key)): "cannot be read",
        ("--ssl-certfile", str(pki.key), "--ssl-keyfile", str(pki.key)): "not a PEM file holding a certificate",
        ("--ssl-certfile", str(pki.cert), "--ssl-keyfile", str(pki.other_key)): "not a usable pair",
    }
    for args, message in cases.items():
        result = serve(tmp_path / "home", *args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stdout, result.stderr)
        assert "serving on" not in result.stdout
