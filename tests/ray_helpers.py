"""What the Ray Serve tests (tests/integration/test_ray_serve.py, test_ray_cluster.py) share: a linear model's
request, which replicas answer it, and the sockets a set of processes listens on."""

from __future__ import annotations

import contextlib

import httpx
import psutil

ROW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
#: The response header naming the replica that answered.
REPLICA = "x-maas-replica"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def infer(client: httpx.Client) -> httpx.Response:
    response = client.post("/v2/models/linear/infer", json=ROW)
    assert response.status_code == 200, response.text
    return response


def answering(client: httpx.Client, count: int = 40) -> set[str]:
    """The replicas that answered ``count`` inferences."""
    return {infer(client).headers[REPLICA] for _ in range(count)}


def listening(procs: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every socket ``procs`` listen on."""
    found = set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip, c.laddr.port))
    return found
