"""The baseline the serving benchmark holds maas against: the FastAPI app one writes in ten minutes.

It answers Open Inference Protocol JSON at ``/v2/models/NAME/infer``: parse the body, run the ONNX session on
it in the event loop (no thread hop, no batching, no limits), and dump the outputs. Run it as
``python bench/naive_server.py MODEL.onnx --port P``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request, Response


def build_app(model_path: str, name: str, threads: int = 0) -> FastAPI:
    """``threads`` 0 is onnxruntime's default (a spinning pool of one thread per core), as a naive app has it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post(f"/v2/models/{name}/infer")
    async def infer(request: Request) -> Response:
        body = json.loads(await request.body())
        feeds = {t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) for t in body["inputs"]}
        results = session.run(None, feeds)
        outputs = [
            {"name": out.name, "datatype": "FP32", "shape": list(value.shape), "data": value.ravel().tolist()}
            for out, value in zip(session.get_outputs(), results, strict=True)
        ]
        payload = {"model_name": name, "outputs": outputs}
        return Response(json.dumps(payload).encode(), media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("--name", default="mlp", help="the model name in the URL")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads; 0: its default")
    args = parser.parse_args()
    app = build_app(args.model, args.name, args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
