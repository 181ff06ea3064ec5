"""The client of the serving-hosts test, run inside a namespace: ``python -m tests.multihost.follow_alias MODEL KEY
URL...``. Waits until every server answers ``MODEL`` (its production alias), moves the alias to version 2 with
``maas models alias set`` (run from here, so from this namespace too), then asks every server until each answers
with version 2. Prints JSON: the versions and outputs before, the seconds from the move's commit (the CLI's exit)
to each server's first answer from version 2, and the outputs after."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}


def infer(client: httpx.Client, url: str, model: str) -> tuple[int, list[float]]:
    r = client.post(f"{url}/v2/models/{model}/infer", json=BODY, timeout=5)
    r.raise_for_status()
    body = r.json()
    return int(body["model_version"]), body["outputs"][0]["data"]


def wait_served(client: httpx.Client, url: str, model: str, deadline: float) -> tuple[int, list[float]]:
    while True:
        try:
            return infer(client, url, model)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main(model: str, key: str, urls: list[str]) -> dict[str, Any]:
    client = httpx.Client(headers={"Authorization": f"Bearer {key}"})
    deadline = time.monotonic() + 120
    before = {url: wait_served(client, url, model, deadline) for url in urls}
    unauthenticated = httpx.post(f"{urls[0]}/v2/models/{model}/infer", json=BODY, timeout=5).status_code
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "maas", "models", "alias", "set", model, "production", "2"], check=True)
    moved = time.monotonic()
    followed: dict[str, float] = {}
    after: dict[str, tuple[int, list[float]]] = {}
    while len(followed) < len(urls) and time.monotonic() < moved + 10:
        for url in urls:
            if url not in followed:
                version, output = infer(client, url, model)
                if version == 2:
                    followed[url], after[url] = time.monotonic() - moved, (version, output)
        time.sleep(0.02)
    return {
        "before": before,
        "after": after,
        "followed_s": followed,
        "cli_s": moved - started,
        "unauthenticated": unauthenticated,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
