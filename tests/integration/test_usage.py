"""Usage metering is exact: the rows a real server (`--workers 2`, auth required) writes to the database add up to the
requests it served over REST and gRPC, errors counted as errors, and to the tokens of the OpenAI API's answers,
streamed ones and a stream the client abandoned included (counted for what was generated). Rows appear within a
second while serving, and what is still in memory is written when the server stops."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from maas.access.keys import KeyStore, database_of
from maas.access.usage import Counters, UsageStore
from maas.registry import Registry
from maas.testing.models import make_linear_model
from maas.testing.server import RemoteServer, scraped
from tests.llm_fixtures import write_tiny_llm_dir

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Hello, world! How are you today?"}]


def _infer(rows: int, width: int = 4) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [rows, width], "datatype": "FP32", "data": [1.0] * (rows * width)}]}


def _totals(store: UsageStore, key_id: str) -> dict[str, Counters]:
    """The key's usage per model (versions and minutes added up)."""
    out: dict[str, Counters] = {}
    for t in store.query(key_id=key_id, by="total"):
        fields = ("requests", "errors", "items", "prompt_tokens", "completion_tokens", "compute_s")
        out.setdefault(t.model, Counters()).add(Counters(*(getattr(t, f) for f in fields)))
    return out


def test_usage_rows_add_up_to_what_was_served(tmp_path: Path) -> None:
    home, models = tmp_path / "home", tmp_path / "models"
    models.mkdir()
    reg = Registry(home=home)
    reg.register(make_linear_model(models / "alpha.onnx"), "alpha")
    reg.register(make_linear_model(models / "beta.onnx", seed=1), "beta")
    reg.register(write_tiny_llm_dir(models / "tiny", max_position_embeddings=2048), "chat", format="causal_lm")
    keys = KeyStore(database_of(reg))
    key, token = keys.create("app", "consumer", models=["alpha", "chat"])
    admin = keys.create("ops", "admin")[1]
    store = UsageStore(database_of(reg))
    auth = {"Authorization": f"Bearer {token}"}

    with RemoteServer(home, args=["--workers", "2"], env={"MAAS_AUTH": "required"}) as server:
        # Tensors: 6 REST requests of 2 rows, 4 gRPC requests of 3 rows; 3 errors (a bad shape on each protocol,
        # and a model the key may not use).
        with httpx.Client(base_url=server.url, headers=auth, timeout=30) as c:
            for _ in range(6):
                assert c.post("/v2/models/alpha/infer", json=_infer(2)).status_code == 200
            assert c.post("/v2/models/alpha/infer", json=_infer(1, width=3)).status_code == 400
            assert c.post("/v2/models/beta/infer", json=_infer(1)).status_code == 404
        with grpcclient.InferenceServerClient(server.grpc_address) as g:
            x = grpcclient.InferInput("x", [3, 4], "FP32")
            x.set_data_from_numpy(np.ones((3, 4), np.float32))
            for _ in range(4):
                g.infer("alpha", [x], headers={"authorization": auth["Authorization"]})
            bad = grpcclient.InferInput("x", [1, 3], "FP32")
            bad.set_data_from_numpy(np.ones((1, 3), np.float32))
            with pytest.raises(InferenceServerException):
                g.infer("alpha", [bad], headers={"authorization": auth["Authorization"]})

        deadline = time.monotonic() + 5  # written while serving: within a flush or two
        while _totals(store, key.id).get("alpha", None) is None or _totals(store, key.id)["alpha"].requests < 10:
            assert time.monotonic() < deadline, _totals(store, key.id)
            time.sleep(0.1)

        # Tokens: two answers, a stream read to its end, and a stream abandoned after a few pieces.
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=token, max_retries=0)
        answers = [client.chat.completions.create(model="chat", messages=ASK, max_tokens=m) for m in (5, 12)]  # type: ignore[arg-type]
        chunks = list(
            client.chat.completions.create(
                model="chat",
                messages=ASK,  # type: ignore[arg-type]
                max_tokens=20,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usages = [a.usage for a in answers] + [chunks[-1].usage]
        assert all(u is not None for u in usages)
        received = 0
        with client.chat.completions.create(model="chat", messages=ASK, max_tokens=1500, stream=True) as stream:  # type: ignore[arg-type]
            for chunk in stream:
                received += bool(chunk.choices and chunk.choices[0].delta.content)
                if received == 5:
                    break
        time.sleep(1.0)  # the server notices the client left
        scrape = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {admin}"}).text
        server.stop()  # SIGINT: the supervisor stops its workers with SIGTERM; each writes what it holds

    totals = _totals(store, key.id)
    assert set(totals) <= {"alpha", "chat", "-"}
    tensors = [t for m, t in totals.items() if m != "chat"]
    assert sum(t.requests for t in tensors) == 6 + 4 + 3
    assert sum(t.errors for t in tensors) == 3
    assert totals["alpha"].requests - totals["alpha"].errors == 10
    assert totals["alpha"].items == 6 * 2 + 4 * 3
    assert totals["alpha"].compute_s > 0

    chat = totals["chat"]
    assert chat.requests == 4 and chat.items == 4
    prompt = usages[0].prompt_tokens  # type: ignore[union-attr]
    assert chat.prompt_tokens == sum(u.prompt_tokens for u in usages) + prompt  # type: ignore[union-attr]
    answered = sum(u.completion_tokens for u in usages)  # type: ignore[union-attr]
    abandoned = chat.completion_tokens - answered
    assert received <= abandoned <= 1500, (received, abandoned)
    # The server's own count of the tokens it generated (abandoned ones included) bounds what was metered.
    generated = scraped(scrape, "maas_llm_tokens_total", model="chat", kind="completion")
    assert answered + received <= chat.completion_tokens <= generated
    assert re.search(r"maas_llm_tokens_total\{", scrape)
