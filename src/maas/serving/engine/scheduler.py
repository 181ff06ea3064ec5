"""The request scheduler of one model version: a bounded FIFO queue, dynamic batching, a fixed number of instances.

Each request waits in the queue until an instance is free; then the oldest request leaves with the compatible
requests queued behind it (same input names, trailing shapes and dtypes), concatenated along dim 0 into one call of
the model (first fit in FIFO order: a request too large for the room left is passed over, never split, and the
oldest request always leaves, so none starves; one larger than ``max_batch_size`` runs alone). With
``max_queue_delay_s`` 0 a request never waits while an instance is idle: batches form only from
requests that arrived while every instance was busy. With a delay, the oldest request's batch is launched when

- it is full: it holds ``max_batch_size`` rows, or the next compatible queued request does not fit; or
- it holds every queued request and its row count is one of ``preferred_batch_sizes``; or
- the oldest request has waited ``max_queue_delay_s``.

A batch whose run fails is re-run request by request, so each gets its own result or its own exception. A batch
whose outputs do not have its row count in dim 0 is answered the same way, and the scheduler stops batching.

The scheduler runs on its caller's event loop (bound on the first :meth:`Scheduler.submit`) and has no thread of
its own; the model runs in the given executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from maas.errors import InvalidInput, RateLimited, Unavailable
from maas.serving.limits import payload_bytes

log = logging.getLogger(__name__)

#: A request alone in the server runs on the event loop when its model's calls take less than this.
INLINE_RUN_S = 0.0005
#: A model whose inline call took longer than this (a stalled event loop) never runs inline again. Calls in a thread
#: do not count: on a busy host a fast call is sometimes preempted for milliseconds, which stalls nothing.
SLOW_CALL_S = 40 * INLINE_RUN_S
#: ... and its inputs hold at most this many bytes.
INLINE_BYTES = 64 * 1024
_UNKNOWN_COST = float("inf")

RunFn = Callable[[dict[str, np.ndarray], list[str] | None], dict[str, np.ndarray]]
"""The model: ``runtime.infer(inputs, outputs)``, called in the executor."""


@dataclass(frozen=True)
class BatchPolicy:
    """How one model version batches and queues. ``max_batch_size`` 1 never concatenates requests;
    ``max_queue_size`` bounds the requests waiting (not running); ``instances`` is how many batches run at once."""

    max_batch_size: int = 1
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256
    instances: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not self.max_queue_delay_s >= 0:
            problems.append(f"max_queue_delay_s must be >= 0 seconds, got {self.max_queue_delay_s}")
        if any(size < 1 for size in self.preferred_batch_sizes):
            problems.append(f"preferred_batch_sizes must all be >= 1, got {list(self.preferred_batch_sizes)}")
        if self.max_queue_size < 0:
            problems.append(f"max_queue_size must be >= 0, got {self.max_queue_size}")
        if self.instances < 1:
            problems.append(f"instances must be >= 1, got {self.instances}")
        if problems:
            raise InvalidInput("invalid batching policy: " + "; ".join(problems))


@dataclass(eq=False)
class _Request:
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    rows: int
    #: Requests with equal keys can be concatenated; None: this request always runs alone.
    key: Hashable | None
    future: asyncio.Future[dict[str, np.ndarray]]
    arrived: float


def _shape_key(inputs: dict[str, np.ndarray]) -> tuple[int, Hashable | None]:
    """(rows, compatibility key) of a request; the key is None when its inputs have no common dim 0."""
    dims = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(dims) != 1 or None in dims:
        return 1, None
    rows = dims.pop()
    assert rows is not None
    return rows, tuple(sorted((name, a.shape[1:], a.dtype.str) for name, a in inputs.items()))


def _merged_run(run: RunFn, batch: list[_Request]) -> list[dict[str, np.ndarray] | None]:
    """Run ``batch`` as one call of the model; each request's outputs, or None for one that must run alone
    (it asked for an output the model did not return). Raises what the model raised; ``_Misaligned`` when an
    output's dim 0 is not the batch's rows."""
    names = batch[0].inputs.keys()
    inputs = {name: np.concatenate([r.inputs[name] for r in batch], axis=0) for name in names}
    first = batch[0].outputs
    same = all(r.outputs == first for r in batch)
    merged = run(inputs, first if same else None)
    total = sum(r.rows for r in batch)
    if any(a.ndim == 0 or a.shape[0] != total for a in merged.values()):
        raise _Misaligned({name: list(a.shape) for name, a in merged.items()}, total)
    offsets = np.cumsum([r.rows for r in batch])[:-1]
    pieces = {name: np.split(a, offsets, axis=0) for name, a in merged.items()}
    results: list[dict[str, np.ndarray] | None] = []
    for i, r in enumerate(batch):
        if r.outputs is not None and not all(name in pieces for name in r.outputs):
            results.append(None)  # its own run reports the unknown output
        else:
            results.append({name: pieces[name][i] for name in merged if r.outputs is None or name in r.outputs})
    return results


class _Misaligned(Exception):
    def __init__(self, shapes: dict[str, list[int]], rows: int) -> None:
        super().__init__(f"outputs {shapes} for a batch of {rows} rows")


class Scheduler:
    """Queues, batches and runs the requests of one model version (``what``, e.g. ``models:/mlp/1``).

    ``batchable``: every input and output of the model has a dynamic dim 0, so requests may be concatenated.
    :attr:`batches` and :attr:`rows` count the model calls made and the rows they ran, for metrics.
    """

    def __init__(
        self,
        run: RunFn,
        policy: BatchPolicy,
        executor: concurrent.futures.Executor,
        *,
        batchable: bool,
        what: str,
        on_batch: Callable[[int, int], None] | None = None,
        inline: bool = False,
    ) -> None:
        self._run = run
        self._policy = policy
        self._executor = executor
        self._batchable = batchable
        self._what = what
        #: Called on the event loop with (rows, requests) of each model call as it starts, for metrics.
        self._on_batch = on_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Request] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = 0  # batches running
        self._running = 0  # requests in those batches
        self._closed = False
        self.batches = 0
        self.rows = 0
        #: Seconds one request's model call takes (a moving average over calls of one request; unknown at first).
        self._cost = _UNKNOWN_COST
        #: May a request alone run on the event loop (the model's cost is bounded by its inputs' size)? Turned off
        #: for good by an inline call slower than SLOW_CALL_S.
        self._inline = inline
        self._row_cost = _UNKNOWN_COST

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def queued(self) -> int:
        """Requests waiting for an instance."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests in the batches now running."""
        return self._running

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, *, alone: bool = False
    ) -> dict[str, np.ndarray]:
        """The model's outputs for ``inputs`` (only those named in ``outputs``; all when None).

        ``alone``: the caller knows of no other request in flight. Such a request to an idle model whose calls
        take under :data:`INLINE_RUN_S` runs on the event loop itself (unless its deployment asks requests to wait
        for company), saving the two thread switches that would
        cost more than the call (under concurrency requests always go through the queue, where they batch).

        Raises ``RateLimited`` at once when the queue is full, ``Unavailable`` once the scheduler is closing, and
        otherwise what the model raised for this request. Cancelling the caller drops the request.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._queue or self._active:
                raise RuntimeError(f"the scheduler of {self._what} is in use on another event loop")
            self._loop = loop
        if self._closed:
            raise self._unloading()
        waits = self._batching() and self._policy.max_queue_delay_s > 0  # asked to wait for company
        if alone and self._inline and not waits and not self._queue and not self._active and self._cost < INLINE_RUN_S:
            rows = _shape_key(inputs)[0]
            if rows * self._row_cost < INLINE_RUN_S and sum(map(payload_bytes, inputs.values())) <= INLINE_BYTES:
                return self._run_inline(inputs, outputs, rows)
        rows, key = _shape_key(inputs) if self._batchable else (1, None)
        request = _Request(inputs, outputs, rows, key, loop.create_future(), loop.time())
        self._queue.append(request)
        self._pump()
        if self._queue and self._queue[-1] is request and len(self._queue) > self._policy.max_queue_size:
            self._queue.pop()
            raise RateLimited(
                f"{self._what} is overloaded: {len(self._queue)} requests are already waiting, the "
                f"max_queue_size of its deployment; retry shortly, or deploy it with more instances"
            )
        try:
            return await request.future
        except asyncio.CancelledError:
            if request in self._queue:
                self._queue.remove(request)
                self._pump()  # the oldest request, whose deadline the timer follows, may be this one
            raise

    def set_policy(self, policy: BatchPolicy) -> None:
        """Use ``policy`` from the next batch on. Queued and running requests are kept, even beyond a smaller
        ``max_queue_size``. Safe to call from any thread."""
        self._policy = policy
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._pump()
        else:
            loop.call_soon_threadsafe(self._pump)

    async def close(self) -> None:
        """Fail the queued requests with ``Unavailable``, refuse new ones, and wait for the running batches."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(self._unloading())
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _unloading(self) -> Unavailable:
        return Unavailable(f"{self._what} is being unloaded; retry")

    def _batching(self) -> bool:
        return self._batchable and self._policy.max_batch_size > 1

    def _pump(self) -> None:
        """Launch batches while an instance is free and a batch is ready; else arm the timer for the oldest."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed or self._loop is None:
            return
        while self._queue and self._active < self._policy.instances:
            batch, ready = self._next_batch()
            if not ready:
                deadline = self._queue[0].arrived + self._policy.max_queue_delay_s
                self._timer = self._loop.call_at(deadline, self._pump)
                return
            for request in batch:
                self._queue.remove(request)
            self._active += 1
            self._running += len(batch)
            task = self._loop.create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _next_batch(self) -> tuple[list[_Request], bool]:
        """The oldest request's batch (first fit over the queue, in FIFO order), and whether to launch it now."""
        policy = self._policy
        head = self._queue[0]
        if not self._batching() or head.key is None or head.rows >= policy.max_batch_size:
            return [head], True
        batch, rows, left_out = [head], head.rows, False
        for request in itertools.islice(self._queue, 1, None):
            if rows == policy.max_batch_size:
                break
            if request.key != head.key:
                continue
            if rows + request.rows > policy.max_batch_size:
                left_out = True
                continue
            batch.append(request)
            rows += request.rows
        if policy.max_queue_delay_s <= 0 or rows >= policy.max_batch_size or left_out:
            return batch, True
        if rows in policy.preferred_batch_sizes and len(batch) == len(self._queue):
            return batch, True
        assert self._loop is not None
        return batch, self._loop.time() - head.arrived >= policy.max_queue_delay_s

    def _run_inline(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, rows: int) -> dict[str, np.ndarray]:
        self._active += 1
        self._running += 1
        self._count(rows, 1)
        started = time.perf_counter()
        try:
            return self._timed_run(inputs, outputs)
        finally:
            if time.perf_counter() - started > SLOW_CALL_S:
                self._inline = False
            self._active -= 1
            self._running -= 1
            self._pump()

    def _timed_run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        """One request's call of the model (in a worker thread, or inline), timed into :attr:`_cost`."""
        started = time.perf_counter()
        try:
            return self._run(inputs, outputs)
        finally:
            spent = time.perf_counter() - started
            per_row = spent / max(1, _shape_key(inputs)[0])
            if self._cost == _UNKNOWN_COST:
                self._cost, self._row_cost = spent, per_row
            else:
                self._cost = 0.8 * self._cost + 0.2 * spent
                self._row_cost = 0.8 * self._row_cost + 0.2 * per_row

    def _count(self, rows: int, requests: int) -> None:
        self.batches += 1
        self.rows += rows
        if self._on_batch is not None:
            self._on_batch(rows, requests)

    async def _execute(self, batch: list[_Request]) -> None:
        """Run one launched batch and answer each of its requests; frees its instance when done."""
        assert self._loop is not None
        loop = self._loop
        try:
            alone = batch
            if len(batch) > 1:
                alone = await self._execute_merged(loop, batch)
            for request in alone:
                if request.future.done():  # the caller went away
                    continue
                self._count(request.rows, 1)
                try:
                    result = await loop.run_in_executor(
                        self._executor, self._timed_run, request.inputs, request.outputs
                    )
                except Exception as exc:
                    if not request.future.done():
                        request.future.set_exception(exc)
                else:
                    if not request.future.done():
                        request.future.set_result(result)
        finally:
            for request in batch:
                if not request.future.done():  # this task was cancelled, e.g. by the loop shutting down
                    request.future.cancel()
            self._active -= 1
            self._running -= len(batch)
            self._pump()

    async def _execute_merged(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> list[_Request]:
        """Run ``batch`` as one call; answer the requests it could, and return those that must run alone."""
        self._count(sum(r.rows for r in batch), len(batch))
        try:
            results = await loop.run_in_executor(self._executor, _merged_run, self._run, batch)
        except _Misaligned as exc:
            if self._batchable:
                log.warning(
                    "%s is not batchable after all (%s); running its requests one by one from now on",
                    self._what,
                    exc,
                )
                self._batchable = False
            return batch
        except Exception as exc:
            log.debug("a batch of %d requests to %s failed (%r); running each alone", len(batch), self._what, exc)
            return batch
        alone = []
        for request, result in zip(batch, results, strict=True):
            if result is None:
                alone.append(request)
            elif not request.future.done():
                request.future.set_result(result)
        return alone
