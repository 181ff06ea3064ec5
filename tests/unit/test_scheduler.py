"""The per-model-version scheduler: batching that never changes a result, bounded queues, failures kept apart."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from maas.errors import InvalidInput, RateLimited, Unavailable
from maas.serving.engine.scheduler import BatchPolicy, Scheduler

pytestmark = pytest.mark.unit

Arrays = dict[str, np.ndarray]
T = TypeVar("T")


class Model:
    """A fake model: output ``y_<name>`` is input ``<name>`` doubled (bytes repeated). Records every call; a call
    waits while ``gate`` is clear, and any negative number in its inputs makes it raise."""

    def __init__(self, *, sleep_s: float = 0.0, aligned: bool = True) -> None:
        self.sleep_s = sleep_s
        self.aligned = aligned
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[Arrays] = []
        self.asked: list[list[str] | None] = []
        self.raised: list[Exception] = []
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: Arrays, outputs: list[str] | None) -> Arrays:
        with self._lock:
            self.calls.append(inputs)
            self.asked.append(outputs)
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            assert self.gate.wait(10), "the test never opened the gate"
            time.sleep(self.sleep_s)
            return self.compute(inputs, outputs)
        finally:
            with self._lock:
                self.active -= 1

    def compute(self, inputs: Arrays, outputs: list[str] | None) -> Arrays:
        if any(a.dtype.kind in "if" and (a < 0).any() for a in inputs.values()):
            exc = ValueError("negative input")
            self.raised.append(exc)
            raise exc
        out = {f"y_{name}": a * 2 for name, a in inputs.items()}
        if not self.aligned:  # one row whatever the batch: not really batchable
            out["total"] = np.array([sum(float(a.sum()) for a in inputs.values() if a.dtype.kind in "if")])
        return out if outputs is None else {name: out[name] for name in outputs}

    @property
    def rows(self) -> list[int]:
        return [len(next(iter(call.values()))) for call in self.calls]


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        yield pool


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


def request(rows: int, seed: int = 0, width: int = 3) -> Arrays:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.random((rows, width), dtype=np.float32),
        "ids": rng.integers(0, 1000, (rows, 2), dtype=np.int64),
        "text": np.array([f"r{seed}-{i}".encode() for i in range(rows)], dtype=object),
    }


async def behind_a_busy_instance(
    scheduler: Scheduler, model: Model, queued: Sequence[tuple[Mapping[str, np.ndarray], list[str] | None]]
) -> list[Arrays | BaseException]:
    """Hold the model on a 1-row request, queue ``queued`` behind it, then let go: the queued requests meet in the
    queue, as under load. Returns their results, exceptions included."""
    model.gate.clear()
    first = asyncio.ensure_future(scheduler.submit(request(1), None))
    await until(lambda: scheduler.running == 1)
    rest = [asyncio.ensure_future(scheduler.submit(dict(inputs), outputs)) for inputs, outputs in queued]
    await until(lambda: scheduler.queued == len(rest))
    model.gate.set()
    await first
    return await asyncio.gather(*rest, return_exceptions=True)


def assert_same(got: Arrays | BaseException, want: Arrays) -> None:
    assert isinstance(got, dict), got
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name])


def test_batched_results_equal_unbatched_for_mixed_sizes_and_dtypes(executor: ThreadPoolExecutor) -> None:
    model = Model(sleep_s=0.005)
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=64), executor, batchable=True, what="models:/m/1")
    requests = [request(rows, seed) for seed, rows in enumerate(list(range(1, 65)) * 2)]

    async def main() -> list[Arrays]:
        return await asyncio.gather(*(scheduler.submit(r, None) for r in requests))

    results = run(main)
    for inputs, got in zip(requests, results, strict=True):
        assert_same(got, Model().compute(inputs, None))
    assert len(model.calls) < len(requests), "requests arriving while the instance was busy should share batches"
    assert max(model.rows) <= 64
    assert sum(model.rows) == sum(len(r["x"]) for r in requests), "every row ran exactly once"
    assert (scheduler.batches, scheduler.rows) == (len(model.calls), sum(model.rows))


def test_a_lone_request_runs_at_once_when_an_instance_is_idle(executor: ThreadPoolExecutor) -> None:
    model = Model()
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=32), executor, batchable=True, what="models:/m/1")

    async def main() -> float:
        task = asyncio.ensure_future(scheduler.submit(request(1), None))
        await asyncio.sleep(0)
        assert (scheduler.queued, scheduler.running) == (0, 1), "launched without waiting for company"
        start = time.monotonic()
        await task
        await scheduler.submit(request(2), None)
        return time.monotonic() - start

    assert run(main) < 0.5


def test_with_a_delay_a_lone_request_waits_for_company_about_that_long(executor: ThreadPoolExecutor) -> None:
    model = Model()
    policy = BatchPolicy(max_batch_size=32, max_queue_delay_s=0.05)
    scheduler = Scheduler(model, policy, executor, batchable=True, what="models:/m/1")

    async def main() -> float:
        start = time.monotonic()
        await scheduler.submit(request(1), None)
        return time.monotonic() - start

    assert 0.045 <= run(main) < 1.0


@pytest.mark.parametrize(
    ("policy", "sizes", "first"),
    [
        (BatchPolicy(max_batch_size=4, max_queue_delay_s=30), [1, 1, 1, 1], 4),  # full
        (BatchPolicy(max_batch_size=16, max_queue_delay_s=30, preferred_batch_sizes=(3,)), [1, 2], 3),  # preferred
        (BatchPolicy(max_batch_size=4, max_queue_delay_s=30), [3, 2], 3),  # the next one does not fit: full
    ],
)
def test_with_a_delay_a_full_or_preferred_batch_launches_without_waiting(
    executor: ThreadPoolExecutor, policy: BatchPolicy, sizes: list[int], first: int
) -> None:
    model = Model()
    scheduler = Scheduler(model, policy, executor, batchable=True, what="models:/m/1")

    async def main() -> None:
        tasks = [asyncio.ensure_future(scheduler.submit(request(n), None)) for n in sizes]
        await until(lambda: len(model.calls) > 0)
        await scheduler.close()  # whatever is left would wait the 30 s
        await asyncio.gather(*tasks, return_exceptions=True)

    run(main)
    assert model.rows[0] == first


def test_batches_form_under_concurrency_and_never_exceed_max_batch_size(executor: ThreadPoolExecutor) -> None:
    model = Model(sleep_s=0.01)
    policy = BatchPolicy(max_batch_size=16, instances=2)
    scheduler = Scheduler(model, policy, executor, batchable=True, what="models:/m/1")
    requests = [request(1 + i % 5, i) for i in range(200)]

    async def main() -> list[Arrays]:
        return await asyncio.gather(*(scheduler.submit(r, None) for r in requests))

    for inputs, got in zip(requests, run(main), strict=True):
        assert_same(got, Model().compute(inputs, None))
    assert max(model.rows) <= 16
    assert len(model.calls) < len(requests) / 3
    assert model.peak <= 2


def test_a_request_larger_than_max_batch_size_runs_alone_unsplit(executor: ThreadPoolExecutor) -> None:
    model = Model()
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=8), executor, batchable=True, what="models:/m/1")
    big = request(20, 99)

    queued = [(r, None) for r in (request(2, 1), big, request(3, 2), request(3, 3))]

    results = run(lambda: behind_a_busy_instance(scheduler, model, queued))
    assert_same(results[1], Model().compute(big, None))
    assert model.rows == [1, 8, 20], "2+3+3 rows go together; the 20-row request runs alone"


def test_requests_with_different_trailing_shapes_or_dtypes_never_share_a_batch(executor: ThreadPoolExecutor) -> None:
    model = Model()
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=64), executor, batchable=True, what="models:/m/1")
    wide = [request(2, i, width=5) for i in range(4)]
    narrow = [request(2, i, width=3) for i in range(4)]
    doubles = [{"x": np.full((2, 3), float(i), dtype=np.float64)} for i in range(4)]
    mixed = [r for trio in zip(wide, narrow, doubles, strict=True) for r in trio]

    results = run(lambda: behind_a_busy_instance(scheduler, model, [(r, None) for r in mixed]))
    for inputs, got in zip(mixed, results, strict=True):
        assert_same(got, Model().compute(inputs, None))
    assert model.rows == [1, 8, 8, 8], "one batch per shape and dtype, none failed and retried"
    assert [call["x"].shape[1:] for call in model.calls[1:]] == [(5,), (3,), (3,)]
    assert [call["x"].dtype for call in model.calls[1:]] == [np.float32, np.float32, np.float64]


def test_a_full_queue_refuses_at_once_with_rate_limited(executor: ThreadPoolExecutor) -> None:
    model = Model()
    policy = BatchPolicy(max_batch_size=8, max_queue_size=2)
    scheduler = Scheduler(model, policy, executor, batchable=True, what="models:/m/1")

    async def main() -> None:
        model.gate.clear()
        tasks = [asyncio.ensure_future(scheduler.submit(request(1, i), None)) for i in range(3)]
        await until(lambda: (scheduler.running, scheduler.queued) == (1, 2))
        start = time.monotonic()
        with pytest.raises(RateLimited) as caught:
            await scheduler.submit(request(1), None)
        assert time.monotonic() - start < 0.5
        assert "models:/m/1" in str(caught.value) and "max_queue_size" in str(caught.value)
        assert "instances" in str(caught.value) and "retry" in str(caught.value)
        assert scheduler.queued == 2
        model.gate.set()
        await asyncio.gather(*tasks)

    run(main)


def test_a_failing_request_in_a_batch_does_not_fail_the_others(executor: ThreadPoolExecutor) -> None:
    model = Model()
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=16), executor, batchable=True, what="models:/m/1")
    bad = {"x": -np.ones((2, 3), dtype=np.float32)}
    good = [{"x": np.full((n, 3), float(n), dtype=np.float32)} for n in (2, 3)]
    queued = [(good[0], None), (bad, None), (good[1], None)]

    ok1, failed, ok2 = run(lambda: behind_a_busy_instance(scheduler, model, queued))
    assert_same(ok1, Model().compute(good[0], None))
    assert_same(ok2, Model().compute(good[1], None))
    assert isinstance(failed, ValueError)
    assert failed is model.raised[-1], "the request gets the very exception its own run raised"
    assert model.rows == [1, 7, 2, 2, 3], "the failed batch of 7 rows re-ran request by request"


def test_outputs_not_aligned_with_the_batch_fall_back_to_one_by_one_for_good(
    executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model(aligned=False)
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=16), executor, batchable=True, what="models:/m/1")
    requests = [{"x": np.full((n, 2), float(n), dtype=np.float32)} for n in (2, 3, 4)]
    queued: list[tuple[Arrays, list[str] | None]] = [(r, None) for r in requests]

    async def main() -> list[Arrays | BaseException]:
        return [
            *await behind_a_busy_instance(scheduler, model, queued),
            *await behind_a_busy_instance(scheduler, model, queued),
        ]

    with caplog.at_level(logging.WARNING, logger="maas.serving.engine.scheduler"):
        results = run(main)
    for inputs, got in zip(requests * 2, results, strict=True):
        assert_same(got, Model(aligned=False).compute(inputs, None))
    assert model.rows == [1, 9, 2, 3, 4, 1, 2, 3, 4], "one merged try, then never again"
    warnings = [r for r in caplog.records if "not batchable" in r.getMessage()]
    assert len(warnings) == 1 and "models:/m/1" in warnings[0].getMessage()


def test_different_requested_outputs_run_with_all_and_each_gets_its_own(executor: ThreadPoolExecutor) -> None:
    model = Model()
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=16), executor, batchable=True, what="models:/m/1")
    asks: list[list[str] | None] = [["y_x"], ["y_ids"], None, ["y_text", "y_x"], ["nope"]]

    async def main() -> tuple[list[Arrays | BaseException], list[Arrays | BaseException]]:
        mixed = await behind_a_busy_instance(scheduler, model, [(request(2, i), ask) for i, ask in enumerate(asks)])
        same = await behind_a_busy_instance(scheduler, model, [(request(2, i), ["y_ids"]) for i in range(3)])
        return mixed, same

    mixed, same = run(main)
    assert isinstance(mixed.pop(), KeyError), "an unknown output fails only the request that asked for it"
    for i, (ask, got) in enumerate(zip(asks[:-1], mixed, strict=True)):
        want = Model().compute(request(2, i), None)
        assert_same(got, {k: v for k, v in want.items() if ask is None or k in ask})
    assert all(isinstance(got, dict) and list(got) == ["y_ids"] for got in same)
    assert model.asked == [None, None, ["nope"], None, ["y_ids"]], "mixed asks run with None, the same ask as is"


def test_a_lone_request_runs_on_its_own_arrays(executor: ThreadPoolExecutor) -> None:
    model = Model()
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=16), executor, batchable=True, what="models:/m/1")
    inputs = request(4)
    run(lambda: scheduler.submit(inputs, None))
    assert all(model.calls[0][name] is inputs[name] for name in inputs)


def test_a_cancelled_request_leaves_the_queue_at_once_and_a_running_one_is_dropped(
    executor: ThreadPoolExecutor,
) -> None:
    model = Model()
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=16), executor, batchable=True, what="models:/m/1")

    async def main() -> Arrays:
        model.gate.clear()
        running = asyncio.ensure_future(scheduler.submit(request(1), None))
        await until(lambda: scheduler.running == 1)
        queued = asyncio.ensure_future(scheduler.submit(request(7), None))
        kept = asyncio.ensure_future(scheduler.submit(request(2), None))
        await until(lambda: scheduler.queued == 2)
        queued.cancel()
        running.cancel()
        await asyncio.gather(queued, running, return_exceptions=True)
        assert scheduler.queued == 1, "the cancelled request left the queue"
        model.gate.set()
        return await kept

    assert_same(run(main), Model().compute(request(2), None))
    assert model.rows == [1, 2], "the cancelled request never ran"
    assert scheduler.running == 0


def test_set_policy_under_load_fails_nothing(executor: ThreadPoolExecutor) -> None:
    model = Model(sleep_s=0.002)
    policies = [
        BatchPolicy(max_batch_size=1, max_queue_size=1000),
        BatchPolicy(max_batch_size=8, max_queue_size=1000, instances=3),
        BatchPolicy(32, max_queue_delay_s=0.003, preferred_batch_sizes=(4, 16), max_queue_size=1000, instances=2),
        BatchPolicy(max_batch_size=4, max_queue_size=1000),
    ]
    scheduler = Scheduler(model, BatchPolicy(max_queue_size=1000), executor, batchable=True, what="models:/m/1")
    requests = [request(1 + i % 6, i) for i in range(300)]

    async def main() -> list[Arrays]:
        work = asyncio.gather(*(scheduler.submit(r, None) for r in requests))
        for i in range(40):
            scheduler.set_policy(policies[i % len(policies)])
            await asyncio.sleep(0.003)
        return await work

    for inputs, got in zip(requests, run(main), strict=True):
        assert_same(got, Model().compute(inputs, None))
    assert model.peak <= 3


def test_a_smaller_max_queue_size_keeps_the_requests_already_queued(executor: ThreadPoolExecutor) -> None:
    model = Model()
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=4), executor, batchable=True, what="models:/m/1")

    async def main() -> None:
        model.gate.clear()
        tasks = [asyncio.ensure_future(scheduler.submit(request(1, i), None)) for i in range(6)]
        await until(lambda: scheduler.queued == 5)
        scheduler.set_policy(BatchPolicy(max_batch_size=4, max_queue_size=2))
        assert scheduler.queued == 5
        with pytest.raises(RateLimited):
            await scheduler.submit(request(1), None)
        model.gate.set()
        await asyncio.gather(*tasks)

    run(main)
    assert model.rows == [1, 4, 1]


def test_close_fails_the_queued_with_unavailable_and_waits_for_the_running(executor: ThreadPoolExecutor) -> None:
    model = Model()
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=4), executor, batchable=True, what="models:/m/1")

    async def main() -> None:
        model.gate.clear()
        running = asyncio.ensure_future(scheduler.submit(request(1), None))
        await until(lambda: scheduler.running == 1)
        queued = [asyncio.ensure_future(scheduler.submit(request(1, i), None)) for i in range(3)]
        await until(lambda: scheduler.queued == 3)
        closing = asyncio.ensure_future(scheduler.close())
        for task in queued:
            with pytest.raises(Unavailable, match=r"models:/m/1 is being unloaded; retry"):
                await task
        assert not closing.done(), "close waits for the running batch"
        model.gate.set()
        await closing
        assert running.done()
        assert_same(running.result(), Model().compute(request(1), None))
        with pytest.raises(Unavailable):
            await scheduler.submit(request(1), None)

    run(main)
    assert model.rows == [1]


def test_instances_is_the_number_of_batches_running_at_once(executor: ThreadPoolExecutor) -> None:
    model = Model(sleep_s=0.02)
    scheduler = Scheduler(model, BatchPolicy(instances=3), executor, batchable=True, what="models:/m/1")

    async def main() -> None:
        await asyncio.gather(*(scheduler.submit(request(1, i), None) for i in range(12)))

    run(main)
    assert model.peak == 3 and len(model.calls) == 12


def test_a_model_that_is_not_batchable_never_gets_concatenated_inputs(executor: ThreadPoolExecutor) -> None:
    model = Model(sleep_s=0.002)
    scheduler = Scheduler(model, BatchPolicy(max_batch_size=32), executor, batchable=False, what="models:/m/1")
    requests = [request(1 + i % 4, i) for i in range(20)]

    async def main() -> list[Arrays]:
        return await asyncio.gather(*(scheduler.submit(r, None) for r in requests))

    for inputs, got in zip(requests, run(main), strict=True):
        assert_same(got, Model().compute(inputs, None))
    assert model.rows == [len(r["x"]) for r in requests]
    assert all(call["x"] is r["x"] for call, r in zip(model.calls, requests, strict=True))


def test_an_invalid_policy_names_what_is_wrong() -> None:
    with pytest.raises(InvalidInput, match=r"max_batch_size must be >= 1, got 0; instances must be >= 1, got 0"):
        BatchPolicy(max_batch_size=0, instances=0)


def _mlp(path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())


def test_a_real_onnx_mlp_batched_matches_one_by_one(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    from maas.runtimes.onnx import FORMAT

    _mlp(tmp_path / "mlp.onnx")
    runtime = FORMAT.load(tmp_path / "mlp.onnx")
    sizes: list[int] = []

    def infer(inputs: Arrays, outputs: list[str] | None) -> Arrays:
        sizes.append(len(inputs["x"]))
        return runtime.infer(inputs, outputs)

    scheduler = Scheduler(infer, BatchPolicy(max_batch_size=64), executor, batchable=True, what="models:/mlp/1")
    rng = np.random.default_rng(1)
    requests = [{"x": rng.standard_normal((1 + i % 9, 4)).astype(np.float32)} for i in range(60)]

    async def main() -> list[Arrays]:
        return await asyncio.gather(*(scheduler.submit(r, ["logits"]) for r in requests))

    for inputs, got in zip(requests, run(main), strict=True):
        np.testing.assert_allclose(got["logits"], runtime.infer(inputs, None)["logits"], rtol=1e-5, atol=1e-5)
    assert len(sizes) < len(requests) and max(sizes) <= 64


def test_a_request_alone_runs_a_fast_model_on_the_event_loop_and_never_a_large_one() -> None:
    where: list[str] = []

    def run(inputs: Arrays, outputs: list[str] | None) -> Arrays:
        where.append(threading.current_thread().name)
        return {"y": inputs["x"] * 2}

    async def go(policy: BatchPolicy) -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="pool") as pool:
            scheduler = Scheduler(run, policy, pool, batchable=True, what="models:/m/1", inline=True)
            small = {"x": np.ones((1, 4), np.float32)}
            for _ in range(3):
                out = await scheduler.submit(small, None, alone=True)
                np.testing.assert_array_equal(out["y"], small["x"] * 2)
            await scheduler.submit({"x": np.ones((1, 4), np.float32)}, None, alone=False)
            await scheduler.submit({"x": np.ones((64, 1024), np.float32)}, None, alone=True)  # 256 KiB: a thread

    asyncio.run(go(BatchPolicy(max_batch_size=8)))
    loop_thread = threading.main_thread().name
    # The first call is timed in a thread; then a request alone runs inline; not alone or large: in a thread.
    assert where[0].startswith("pool") and where[1:3] == [loop_thread, loop_thread], where
    assert where[3].startswith("pool") and where[4].startswith("pool"), where

    where.clear()
    asyncio.run(go(BatchPolicy(max_batch_size=8, max_queue_delay_s=0.001)))  # asked to wait for company
    assert all(name.startswith("pool") for name in where), where
