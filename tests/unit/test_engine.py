"""The serving engine in-process: deployments applied to a version's scheduler, schedulers of unloaded versions
forgotten, the batch-dimension rule, Triton's config view, and metrics of batches."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from maas.registry import Registry
from maas.serving.engine.core import Engine, batchable
from maas.serving.engine.types import InferRequest
from maas.serving.manager import ModelManager
from maas.serving.metrics import ServerMetrics
from maas.serving.settings import ServerSettings
from maas.tensors import Signature, TensorSpec
from maas.testing.models import make_linear_model, make_text_model, save_graph


def _engine(registry: Registry, pool: ThreadPoolExecutor) -> Engine:
    manager = ModelManager(registry, watch_interval_s=60)
    for event in manager.sync():
        assert event.wait(30)
    return Engine(manager, ServerMetrics(), pool, ServerSettings())


def _request(x: np.ndarray) -> object:
    return lambda signature: InferRequest({"x": x})


def test_batchable_needs_a_dynamic_first_dimension_everywhere() -> None:
    spec = TensorSpec("x", "FP32", (-1, 4))
    assert batchable(Signature(inputs=(spec,), outputs=(TensorSpec("y", "FP32", (-1, 2)),)))
    assert not batchable(Signature(inputs=(spec,), outputs=(TensorSpec("n", "INT64", (1,)),)))
    assert not batchable(Signature(inputs=(TensorSpec("x", "FP32", (4,)),), outputs=()))
    assert not batchable(Signature(inputs=(), outputs=()))


def test_a_deployment_change_reaches_the_scheduler_on_the_next_request(registry: Registry, tmp_path: Path) -> None:
    registry.register(make_linear_model(tmp_path / "a.onnx"), "lin")
    with ThreadPoolExecutor(2) as pool:
        engine = _engine(registry, pool)

        async def go() -> None:
            x = np.ones((2, 4), np.float32)
            loaded, response = await engine.infer("lin", None, _request(x))  # type: ignore[arg-type]
            assert response.outputs["y"].shape == (2, 2) and response.model_version == "1"
            assert engine.scheduler(loaded).policy.max_batch_size == 1
            registry.deploy("lin", max_batch_size=8, max_queue_size=3, instances=2)
            engine.manager.sync()
            _, response = await engine.infer("lin", None, _request(x))  # type: ignore[arg-type]
            policy = engine.scheduler(loaded).policy
            assert (policy.max_batch_size, policy.max_queue_size, policy.instances) == (8, 3, 2)
            results = await asyncio.gather(
                *[engine.infer("lin", None, _request(np.full((1, 4), i, np.float32))) for i in range(3)]  # type: ignore[arg-type]
            )
            ys = [r.outputs["y"] for _, r in results]
            for i, y in enumerate(ys):
                np.testing.assert_allclose(y, loaded.runtime.infer({"x": np.full((1, 4), i, np.float32)})["y"])
            config = await engine.model_config("lin", None)
            assert config["max_batch_size"] == 8 and config["instance_group"][0]["count"] == 2
            assert config["input"][0] == {"name": "x", "data_type": "TYPE_FP32", "dims": [4]}
            assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 3

        asyncio.run(go())
        engine.manager.stop()


def test_schedulers_of_versions_let_go_are_forgotten(registry: Registry, tmp_path: Path) -> None:
    registry.register(make_linear_model(tmp_path / "a.onnx", seed=1), "lin")
    registry.register(make_linear_model(tmp_path / "b.onnx", seed=2), "lin")
    with ThreadPoolExecutor(2) as pool:
        engine = _engine(registry, pool)

        async def go() -> None:
            x = np.ones((1, 4), np.float32)
            old, _ = await engine.infer("lin", "1", _request(x))  # type: ignore[arg-type]
            current, _ = await engine.infer("lin", None, _request(x))  # type: ignore[arg-type]
            assert {k[1] for k in engine._schedulers} == {1, 2}
            registry.delete_version("lin", 1)
            engine.manager.sync()
            engine.sweep()
            assert {k[1] for k in engine._schedulers} == {2}
            assert not engine.manager.holds(old) and engine.manager.holds(current)

        asyncio.run(go())
        engine.manager.stop()


def test_a_model_without_a_batch_dimension_is_never_batched(registry: Registry, tmp_path: Path) -> None:
    registry.register(make_text_model(tmp_path / "t.onnx"), "text")  # its `batch` output has no batch dimension
    registry.deploy("text", max_batch_size=16)
    with ThreadPoolExecutor(2) as pool:
        engine = _engine(registry, pool)

        async def go() -> None:
            def request(n: int) -> object:
                return lambda signature: InferRequest({"text": np.array([b"a"] * n, dtype=object)})

            results = await asyncio.gather(*[engine.infer("text", None, request(n)) for n in (1, 2, 3, 4)])  # type: ignore[arg-type]
            assert [int(r.outputs["batch"][0]) for _, r in results] == [1, 2, 3, 4]
            metrics = engine.metrics.render().decode()
            assert 'maas_batch_size_count{model="text",version="1"} 4.0' in metrics

        asyncio.run(go())
        engine.manager.stop()


def _graph_model(path: Path, nodes: list, inputs: list, outputs: list) -> Path:  # type: ignore[type-arg]
    from onnx import helper

    return save_graph(helper.make_graph(nodes, "g", inputs, outputs), path)


def test_only_a_shared_named_first_dimension_is_a_batch_dimension(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from maas import runtimes
    from maas.runtimes.base import batches_rows, cost_bounded

    linear = runtimes.load(make_linear_model(tmp_path / "lin.onnx"), "onnx")
    assert batches_rows(linear) and cost_bounded(linear)
    # x [rows, cols] -> sum over rows [cols]: every dimension is dynamic, but `cols` is no batch dimension.
    mixer = _graph_model(
        tmp_path / "mix.onnx",
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "cols"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["cols"])],
    )
    runtime = runtimes.load(mixer, "onnx")
    assert batchable(runtime.signature) and not batchable(runtime.signature, runtime)
    # n -> an n x n matrix: the work is what a value asks, so it must never run on the event loop.
    grow = _graph_model(
        tmp_path / "grow.onnx",
        [helper.make_node("ConstantOfShape", ["n"], ["y"])],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )
    assert not cost_bounded(runtimes.load(grow, "onnx"))
