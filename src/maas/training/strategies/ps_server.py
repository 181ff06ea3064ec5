"""One parameter server's shard: its parameters, their optimizer, the workers' clocks and the staleness gate.

Transport-free: :mod:`ps_transport` calls these methods from its RPC handlers (several threads at once), a test
calls them directly. A worker's *clock* is the number of its steps the server has applied. Every push is answered
with a future that completes when the worker may go on to its next step:

- ``sync``: when all workers' pushes for that step are in; their gradients are averaged (summed in worker order,
  so the result does not depend on arrival order) and applied as one optimizer step, as DDP would.
- ``async``: at once; each push is applied on arrival as its own optimizer step at ``lr / workers``, so that one
  round of pushes moves the parameters about as far as one averaged step (a learning rate means the same in
  every mode, for SGD and Adam alike).
- ``bounded``: applied on arrival like ``async``, but the answer waits until the worker's clock is at most
  ``max_staleness`` ahead of the slowest worker's (stale-synchronous parallel); ``max_staleness: 0`` is
  lock-step without averaging.

Each answer is recorded as ``{server, worker, worker_clock, min_clock}`` at the moment the worker is let go, so the
staleness a worker actually ran with is observable (the strategy writes them to ``ps_clocks.json``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

Mode = Literal["sync", "async", "bounded"]
Grads = dict[str, torch.Tensor]
#: a shard as it travels: ``{"params": {name: tensor}, "optim": {name: {state key: tensor or number}}}``
Shard = dict[str, dict[str, Any]]


def may_continue(clock: int, clocks: Iterable[int], max_staleness: int | None) -> bool:
    """Whether a worker at ``clock`` may start its next step while the workers' clocks are ``clocks``.

    ``max_staleness`` None means no bound (``async``).
    """
    return max_staleness is None or clock - min(clocks) <= max_staleness


class ParameterServer:
    def __init__(
        self,
        index: int,
        params: Mapping[str, nn.Parameter],
        optimizer: torch.optim.Optimizer | None,
        *,
        workers: list[int],
        mode: Mode,
        max_staleness: int,
    ) -> None:
        if params and optimizer is None:
            raise ValueError("a server that holds parameters needs an optimizer")
        self.index = index
        self.params = dict(params)
        self.optimizer = optimizer
        self.workers = sorted(workers)
        self.mode = mode
        self.bound: int | None = {"sync": 0, "async": None, "bounded": max_staleness}[mode]
        self.clocks = dict.fromkeys(self.workers, 0)
        self._records: list[tuple[int, int, int]] = []  # (worker, worker_clock, min_clock): small, one per answer
        self._lock = threading.Lock()
        self._pending: dict[int, dict[int, tuple[float, Grads]]] = {}  # sync: step -> worker -> push
        self._held: dict[int, torch.futures.Future[None]] = {}  # worker -> answer not yet given
        self._done: set[int] = set()
        self._all_done = threading.Event()

    # --- what workers call -------------------------------------------------------------------------------------

    def push(self, worker: int, step: int, lr: float, grads: Grads) -> torch.futures.Future[None]:
        """Take ``worker``'s gradients of its step ``step`` (0-based); the future completes when it may go on."""
        answer: torch.futures.Future[None] = torch.futures.Future()
        with self._lock:
            if worker not in self.clocks or step != self.clocks[worker] or worker in self._held:
                answer.set_exception(
                    RuntimeError(  # type: ignore[arg-type]  # torch's stub types it as the result type
                        f"server {self.index} got step {step} from worker {worker}, expected step "
                        f"{self.clocks.get(worker)} from one of workers {self.workers}"
                    )
                )
                return answer
            self._held[worker] = answer
            failure: Exception | None = None
            try:
                if self.mode == "sync":
                    arrived = self._pending.setdefault(step, {})
                    arrived[worker] = (lr, grads)
                    if len(arrived) == len(self.workers):
                        del self._pending[step]
                        self._apply(arrived[self.workers[0]][0], _mean([arrived[w][1] for w in self.workers]))
                        for w in self.workers:
                            self.clocks[w] = step + 1
                else:
                    self._apply(lr / len(self.workers), grads)
                    self.clocks[worker] = step + 1
            except Exception as exc:  # every worker waiting on this update hears of it, none hangs
                failure = exc
                released = list(self._held.values()) if self.mode == "sync" else [self._held.pop(worker)]
                if self.mode == "sync":
                    self._held.clear()
            else:
                released = self._release()
        for future in released:
            if failure is None:
                future.set_result(None)
            else:
                future.set_exception(failure)  # type: ignore[arg-type]  # (see push)
        return answer

    def pull(self, with_optimizer: bool = False) -> Shard:
        """A copy of the shard's parameters (and its optimizer state, for checkpoints)."""
        with self._lock:
            params = {n: p.detach().clone() for n, p in self.params.items()}
            optim: dict[str, Any] = {}
            if with_optimizer and self.optimizer is not None:
                for n, p in self.params.items():
                    if p in self.optimizer.state:
                        optim[n] = {k: _copy(v) for k, v in self.optimizer.state[p].items()}
        return {"params": params, "optim": optim}

    def restore(self, step: int, shard: Shard) -> None:
        """Resume from a checkpoint: parameters, optimizer state, and every worker's clock at ``step``."""
        with self._lock:
            if self._held or self._pending:
                raise RuntimeError(f"server {self.index} cannot restore while pushes are in flight")
            with torch.no_grad():
                for n, value in shard["params"].items():
                    self.params[n].copy_(value)
            if self.optimizer is not None:
                for n, state in shard.get("optim", {}).items():
                    self.optimizer.state[self.params[n]] = {k: _copy(v) for k, v in state.items()}
            self.clocks = dict.fromkeys(self.workers, step)

    def done(self, worker: int) -> None:
        with self._lock:
            self._done.add(worker)
            if self._done >= set(self.workers):
                self._all_done.set()

    # --- what the server process calls ---------------------------------------------------------------------------

    @property
    def records(self) -> list[dict[str, int]]:
        """One per answer to a push: ``{server, worker, worker_clock, min_clock}`` when the worker was let go."""
        with self._lock:
            return [
                {"server": self.index, "worker": w, "worker_clock": clock, "min_clock": low}
                for w, clock, low in self._records
            ]

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until every worker has said it is done (or ``timeout`` passed)."""
        return self._all_done.wait(timeout)

    # --- inside the lock -----------------------------------------------------------------------------------------

    def _apply(self, lr: float, grads: Grads) -> None:
        if self.optimizer is None:
            return
        for n, p in self.params.items():
            g = grads.get(n)
            p.grad = None if g is None else g.to(p.dtype)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for p in self.params.values():
            p.grad = None

    def _release(self) -> list[torch.futures.Future[None]]:
        low = min(self.clocks.values())
        released = []
        for worker in sorted(self._held):
            if worker in self._waiting_for_sync():
                continue
            if may_continue(self.clocks[worker], self.clocks.values(), self.bound):
                released.append(self._held.pop(worker))
                self._records.append((worker, self.clocks[worker], low))
        return released

    def _waiting_for_sync(self) -> set[int]:
        return {w for arrived in self._pending.values() for w in arrived}


def _mean(grads: list[Grads]) -> Grads:
    total: Grads = {}
    for g in grads:  # in worker order: the sum does not depend on which push came first
        for n, t in g.items():
            if n in total:
                total[n] += t
            else:
                total[n] = t.clone()
    return {n: t / len(grads) for n, t in total.items()}


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
