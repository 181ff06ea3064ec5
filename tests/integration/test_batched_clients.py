"""With dynamic batching on, the unmodified Triton clients (HTTP JSON, HTTP binary, gRPC) get exactly what in-process
ONNX Runtime computes, for every datatype (BYTES too) and batch sizes 1 to 64 sent at once, while the server merges
requests of different clients and sizes into shared model calls."""

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from maas.registry import Registry
from maas.testing.models import make_identity_model
from maas.testing.server import RemoteServer
from tests.integration.test_grpc import DATATYPES, sample

pytestmark = pytest.mark.slow

ALL_TYPES = [*DATATYPES, "BYTES"]
BATCHES = [1, 2, 3, 5, 8, 13, 21, 34, 64]
WIDTH = 3


def values(datatype: str, batch: int, seed: int) -> np.ndarray:
    if datatype == "BYTES":
        rng = np.random.default_rng(seed)
        words = [f"w{int(i)}-é".encode() for i in rng.integers(0, 10**6, size=batch * WIDTH)]
        return np.array(words, dtype=object).reshape(batch, WIDTH)
    return sample(datatype, (batch, WIDTH), seed)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, dict[str, ort.InferenceSession]]]:
    home = tmp_path_factory.mktemp("batched-home")
    folder = tmp_path_factory.mktemp("batched-models")
    reg = Registry(home=home)
    sessions = {}
    for datatype in ALL_TYPES:
        name = f"id_{datatype.lower()}"
        path = make_identity_model(folder / f"{name}.onnx", datatype, WIDTH)
        reg.register(path, name)
        # Up to 64 rows a call, waiting 5 ms for company: concurrent requests are merged.
        reg.deploy(name, max_batch_size=64, max_queue_delay_ms=5)
        sessions[datatype] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with RemoteServer(home) as server:
        yield server, sessions


def expected(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    if x.dtype == object:
        out = session.run(None, {"x": np.array([v.decode() for v in x.ravel()], dtype=object).reshape(x.shape)})[0]
        return np.array([v.encode() for v in out.ravel()], dtype=object).reshape(x.shape)
    return session.run(None, {"x": x})[0]


def http_call(server: RemoteServer, binary: bool) -> Callable[[str, np.ndarray], np.ndarray]:
    local = threading.local()  # tritonclient.http's client lives on one thread (gevent)

    def call(datatype: str, x: np.ndarray) -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(server.address)
        client = local.client
        inp = httpclient.InferInput("x", list(x.shape), datatype)
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("y", binary_data=binary)
        result = client.infer(f"id_{datatype.lower()}", [inp], outputs=[out])
        y = result.as_numpy("y")
        assert y is not None
        return y

    return call


def grpc_call(server: RemoteServer) -> Callable[[str, np.ndarray], np.ndarray]:
    client = grpcclient.InferenceServerClient(server.grpc_address)

    def call(datatype: str, x: np.ndarray) -> np.ndarray:
        inp = grpcclient.InferInput("x", list(x.shape), datatype)
        inp.set_data_from_numpy(x)
        y = client.infer(f"id_{datatype.lower()}", [inp]).as_numpy("y")
        assert y is not None
        return y

    return call


@pytest.mark.parametrize("transport", ["http-json", "http-binary", "grpc"])
def test_batched_answers_equal_onnxruntime_for_every_datatype_and_batch_size(
    served: tuple[RemoteServer, dict[str, ort.InferenceSession]], transport: str
) -> None:
    server, sessions = served
    call = grpc_call(server) if transport == "grpc" else http_call(server, binary=transport == "http-binary")
    jobs = [(dt, values(dt, b, seed=b * 31 + i), i) for i, dt in enumerate(ALL_TYPES) for b in BATCHES]

    def run(job: tuple[str, np.ndarray, int]) -> None:
        datatype, x, _ = job
        y = call(datatype, x)
        want = expected(sessions[datatype], x)
        assert y.shape == want.shape, (datatype, x.shape, y.shape)
        if datatype == "BYTES":
            got = [v.encode() if isinstance(v, str) else bytes(v) for v in y.ravel()]  # JSON gives text
            assert got == [bytes(v) for v in want.ravel()], datatype
        else:
            np.testing.assert_array_equal(y, want, err_msg=f"{transport} {datatype} batch {len(x)}")
            if datatype.startswith("FP"):  # -0.0 keeps its sign
                np.testing.assert_array_equal(np.signbit(y), np.signbit(want))

    before = _calls_and_requests(server)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run, jobs * 2))
    calls, requests = (a - b for a, b in zip(_calls_and_requests(server), before, strict=True))
    assert requests == 2 * len(jobs)
    assert calls < requests, f"{calls} model calls for {requests} requests: nothing was batched"


def _calls_and_requests(server: RemoteServer) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics").text
    calls = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("maas_batch_size_count"))
    requests = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("maas_inference_requests_total") and 'outcome="success"' in line
    )
    return calls, requests
