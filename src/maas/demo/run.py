"""``maas demo``: digits from training to a live, versioned Open Inference Protocol API."""

from __future__ import annotations

import threading
import time

import numpy as np
from rich.console import Console

from maas import envs
from maas.registry import ModelVersion, Registry

MODEL_NAME = "digits"


class _ServerThread:
    """uvicorn in a background thread of this process, stoppable."""

    def __init__(self, host: str, port: int) -> None:
        import uvicorn

        from maas.serving.app import create_app
        from maas.serving.settings import ServerSettings

        settings = ServerSettings.from_env(host=host, port=port, models=[MODEL_NAME])
        config = uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="maas-demo-server", daemon=True)

    def start(self, url: str, timeout_s: float = 60.0) -> None:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if not self.thread.is_alive():
                raise RuntimeError(f"the server stopped while starting (is {url} already in use?)")
            time.sleep(0.1)
        raise TimeoutError(f"the server at {url} was not ready within {timeout_s:.0f}s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _pick_port(host: str, wanted: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, wanted))  # port 0, or a taken port, gets a free one
        except OSError:
            s.bind((host, 0))
        return int(s.getsockname()[1])


DEMO_CONFIG: dict[str, object] = {
    "name": "digits-demo",
    "model": {"factory": "maas.demo.digits:mlp", "kwargs": {"hidden": 128}},
    "data": {"train": "maas.demo.digits:train_dataset", "eval": "maas.demo.digits:test_dataset"},
    "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001},
    "schedule": {"name": "cosine", "warmup_steps": 20},
    "steps": 1000,  # ~0.978 test accuracy: a teacher worth distilling (400 steps stopped at ~0.95)
    "batch_size": 64,
    "seed": 0,
    "deterministic": True,
    "eval": {"metric": "accuracy"},
    "checkpoint": {"every_steps": 500},
    "strategy": {"name": "ddp"},
    "log_every": 20,
    "publish": {
        "name": MODEL_NAME,
        "alias": "production",
        "head": "classifier",
        "input_names": ["pixels"],
        "description": "MLP 64-128-10 on scikit-learn's handwritten digits, trained with ddp on 2 processes",
    },
}


def train_and_register(console: Console, registry: Registry, nproc: int = 2) -> ModelVersion:
    """Train with data parallelism on ``nproc`` processes; the run publishes ``digits@production``."""
    from maas.training.launch import train

    console.print(
        f"[bold]1. Train[/]  digits (1347 training, 450 test images, bundled with scikit-learn) with ddp on "
        f"{nproc} processes"
    )
    run = train(DEMO_CONFIG, nproc_per_node=nproc, registry=registry, progress="maas.cli.train_progress:RichProgress")
    console.print(
        f"   run {run.id[:12]} {run.status}: test accuracy in-process [bold]{run.eval_metrics['accuracy']:.4f}[/]"
    )
    assert run.model_uri is not None
    mv = registry.resolve(run.model_uri)
    sig = (
        ", ".join(s.describe() for s in mv.signature.inputs)
        + " -> "
        + ", ".join(s.describe() for s in mv.signature.outputs)
    )
    console.print(f"[bold]2. Registered[/] [bold]{mv.uri}[/] (alias production): {sig}")
    return mv


def classify_through_server(url: str, version: ModelVersion) -> float:
    """Send the test split to the server with the unmodified tritonclient; the accuracy it measures."""
    import tritonclient.http as httpclient

    from maas.demo.digits import load_digits_split

    data = load_digits_split()
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    correct = 0
    try:
        for i in range(0, len(data.x_test), 64):
            batch = data.x_test[i : i + 64]
            inp = httpclient.InferInput("pixels", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            result = client.infer(MODEL_NAME, [inp], outputs=[httpclient.InferRequestedOutput("label")])
            served_version = result.get_response()["model_version"]
            if served_version != str(version.version):
                raise RuntimeError(f"server answered with version {served_version}, expected {version.version}")
            correct += int((result.as_numpy("label") == data.y_test[i : i + 64]).sum())
    finally:
        client.close()
    return correct / len(data.x_test)


def next_steps(url: str) -> str:
    payload = '{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","data":[' + ",".join(["0.5"] * 64) + "]}]}"
    return f"""[bold]Try next[/] (in another terminal, MAAS_HOME={envs.MAAS_HOME}):
  curl {url}/v2/models/{MODEL_NAME}
  curl -X POST {url}/v2/models/{MODEL_NAME}/infer -H 'Content-Type: application/json' \\
       -d '{payload}'
  python -c "import numpy as np, tritonclient.http as t; c=t.InferenceServerClient('{url.removeprefix("http://")}'); \\
i=t.InferInput('pixels',[1,64],'FP32'); i.set_data_from_numpy(np.zeros((1,64),np.float32)); \\
print(c.infer('{MODEL_NAME}',[i]).as_numpy('label'))"
  maas models list
  maas models show {MODEL_NAME}
  maas models alias set {MODEL_NAME} production 1     # the server follows within a second
  maas models rollback {MODEL_NAME}
  maas compress {MODEL_NAME} --recipe examples/compress/digits_prune.yaml --name {MODEL_NAME}-small  # repo root
  maas models report {MODEL_NAME}-small
  curl {url}/metrics"""


def run_demo(
    *, smoke: bool = False, host: str = "127.0.0.1", port: int = 8000, console: Console | None = None
) -> float:
    """Train, register, serve and check the digits model; returns the accuracy measured through the server.
    Unless ``smoke``, keeps serving until interrupted."""
    from maas.demo.digits import load_digits_split

    console = console or Console()
    console.print(f"[bold]maas demo[/]  (registry at {envs.MAAS_HOME})")
    registry = Registry()
    version = train_and_register(console, registry)

    port = _pick_port(host, port)
    url = f"http://{host}:{port}"
    console.print(f"[bold]3. Serve[/]  starting the server on {url}")
    server = _ServerThread(host, port)
    server.start(url)
    try:
        console.print("[bold]4. Classify through the server[/] with tritonclient (Open Inference Protocol v2)")
        served_acc = classify_through_server(url, version)
        n = len(load_digits_split().y_test)
        console.print(
            f"   accuracy measured through the server: [bold green]{served_acc:.4f}[/] "
            f"({round(served_acc * n)} of {n} test images)"
        )
        if smoke:
            return served_acc
        console.print(next_steps(url))
        console.print("Serving until Ctrl-C.")
        while server.thread.is_alive():
            time.sleep(0.5)
        return served_acc
    except KeyboardInterrupt:
        return float(np.nan)
    finally:
        server.stop()
