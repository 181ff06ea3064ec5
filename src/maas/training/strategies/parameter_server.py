"""``parameter_server``: ranks ``0..servers-1`` hold the parameters and run the optimizer; the other ranks are workers.

The parameters are sharded over the servers, balanced by size (:func:`balance_shards`); each server runs the
optimizer on its shard. A worker reads its data shard (``(rank - servers, workers)``), does forward and backward on
its own full copy of the model (no DDP), pushes each gradient to the server that owns it, and pulls fresh
parameters once the servers let it go on. When that is depends on the mode (``sync``, ``async``, ``bounded``; see
:mod:`maas.training.strategies.ps_server`). The transport is ``torch.distributed.rpc``
(:mod:`maas.training.strategies.ps_transport`).

- The loop's collectives run over the workers' own process group (:attr:`process_group`): servers never enter the
  loop. In ``async`` and ``bounded`` mode the logged loss is the reporting worker's own, since averaging it over the
  workers would make them wait for each other at every log step.
- A checkpoint has the layout ``single`` and ``ddp`` write (the whole model and its optimizer state): the workers
  pull the servers' parameters and optimizer state into their copy before saving, and on resume the first worker
  hands them back to the servers. Buffers (batch-norm statistics) are not served: each worker keeps its own, and
  checkpoints and the published model hold the first worker's.
- The first worker (rank ``servers``) reports: it logs, evaluates and publishes the servers' final parameters.
- When every worker is done, server 0 writes each server's clock records to ``run_dir/ps_clocks.json``.

Test hook: ``MAAS_PS_SLOW_WORKER=RANK:SECONDS`` makes that worker sleep ``SECONDS`` every step, so that tests can
watch the staleness bound hold; it is not for use in training.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from maas import envs
from maas.errors import InvalidInput
from maas.training.strategies import ps_transport
from maas.training.strategies.base import LossFn, OptimizerFactory, PenaltyFn, Strategy, WorkerContext
from maas.training.strategies.ps_server import Grads, ParameterServer, Shard
from maas.training.strategies.ps_transport import RpcTransport, Transport

CLOCKS_FILE = "ps_clocks.json"


def balance_shards(sizes: Mapping[str, int], servers: int) -> list[list[str]]:
    """Names per server: largest tensor first, each to the server with the fewest elements so far (ties: the
    lowest server). Within a shard the names keep ``sizes``' order."""
    order = {name: i for i, name in enumerate(sizes)}
    loads = [0] * servers
    shards: list[list[str]] = [[] for _ in range(servers)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], order[n])):
        server = min(range(servers), key=lambda s: (loads[s], s))
        shards[server].append(name)
        loads[server] += sizes[name]
    return [sorted(shard, key=order.__getitem__) for shard in shards]


def slow_seconds(rank: int, hook: str | None) -> float:
    """The per-step sleep ``MAAS_PS_SLOW_WORKER`` (``RANK:SECONDS``) asks of ``rank``: a test hook."""
    if not hook:
        return 0.0
    who, _, seconds = hook.partition(":")
    try:
        target, delay = int(who), float(seconds)
    except ValueError:
        raise InvalidInput(f"MAAS_PS_SLOW_WORKER={hook!r} is not RANK:SECONDS (e.g. 2:0.5); unset it") from None
    return delay if target == rank else 0.0


class ParameterServerStrategy(Strategy):
    def __init__(self, config: Any, ctx: WorkerContext) -> None:
        super().__init__(config, ctx)
        self.servers: int = config.servers
        self.workers: int = config.data_parallel_size(ctx.world_size)
        self.owner: dict[str, int] = {}  # parameter name -> server rank
        self.group: dist.ProcessGroup | None = None  # the workers'
        self.transport: Transport | None = None
        self.server: ParameterServer | None = None  # on server ranks
        self._step = 0  # steps this worker has pushed
        self._lr = 0.0
        self._slow = slow_seconds(ctx.rank, envs.MAAS_PS_SLOW_WORKER)

    # --- placement -----------------------------------------------------------------------------------------------

    def data_parallel(self) -> tuple[int, int]:
        return self.ctx.rank - self.servers, self.workers

    @property
    def is_trainer(self) -> bool:
        return self.ctx.rank >= self.servers

    @property
    def reports(self) -> bool:
        return self.ctx.rank == self.servers

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        return self.group

    def build(self, model_factory: Callable[[], nn.Module], optimizer_factory: OptimizerFactory) -> None:
        """Collective over all ranks: the workers' process group and RPC are set up here."""
        model = model_factory()
        named = dict(model.named_parameters())
        shards = balance_shards({n: p.numel() for n, p in named.items()}, self.servers)
        self.owner = {name: server for server, names in enumerate(shards) for name in names}
        worker_ranks = list(range(self.servers, self.ctx.world_size))
        self.group = dist.new_group(worker_ranks)
        if self.is_trainer:
            self.model = self.wrapped = model.to(self.ctx.device)
            # Takes no steps: it holds the servers' optimizer state, in the layout checkpoints use.
            self.optimizer = optimizer_factory(self.model.parameters())
        else:
            # Servers keep their shard on the CPU, so that RPC needs no device maps.
            mine = {n: named[n] for n in shards[self.ctx.rank]}
            self.server = ParameterServer(
                self.ctx.rank,
                mine,
                optimizer_factory(mine.values()) if mine else None,
                workers=worker_ranks,
                mode=self.config.mode,
                max_staleness=self.config.max_staleness,
            )
            ps_transport.host(self.server)  # before RPC starts: no push may find an empty server
        self.transport = RpcTransport.start(self.ctx.rank, self.ctx.world_size)

    # --- the step (workers) --------------------------------------------------------------------------------------

    def train_step(
        self,
        micro_batches: list[Any],
        loss_fn: LossFn,
        penalty: PenaltyFn,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    ) -> torch.Tensor:
        assert self.model is not None and self.transport is not None
        device = self.ctx.device
        self.model.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        n = len(micro_batches)
        for x, y in micro_batches:
            with autocast():
                loss = loss_fn(self.model(x.to(device)), y.to(device))
                extra = penalty(self.model)
                if extra is not None:
                    loss = loss + extra
                (loss / n).backward()
            total += loss.detach().float() / n
        if self._slow:
            time.sleep(self._slow)
        grads: list[Grads] = [{} for _ in range(self.servers)]
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                grads[self.owner[name]][name] = p.grad.detach().cpu()
        pushes = [self.transport.push(s, self.ctx.rank, self._step, self._lr, grads[s]) for s in range(self.servers)]
        torch.futures.wait_all(pushes)
        self._step += 1
        self._pull()
        return total

    def mean_over_trainers(self, value: torch.Tensor) -> float:
        if self.config.mode != "sync":
            return float(value)
        value = value.clone()
        dist.all_reduce(value, group=self.group)
        return float(value) / self.workers

    def set_lr(self, lr: float) -> None:
        self._lr = lr  # travels with each push; the servers' optimizers step with it

    # --- state (workers) -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Collective over the workers: the servers' parameters and optimizer state, once every push is in."""
        assert self.group is not None
        dist.barrier(group=self.group)
        self._pull(with_optimizer=True)
        self._sync_buffers()
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Collective over the workers: the first one hands the checkpoint to the servers before anyone pushes."""
        assert self.model is not None and self.optimizer is not None and self.transport is not None
        super().load_state_dict(state)
        self._step = int(state["loop"]["step"]) if "loop" in state else 0
        if self.reports:
            shards: list[Shard] = [{"params": {}, "optim": {}} for _ in range(self.servers)]
            for name, p in self.model.named_parameters():
                shard = shards[self.owner[name]]
                shard["params"][name] = p.detach().cpu()
                if p in self.optimizer.state:
                    shard["optim"][name] = {k: _to(v, torch.device("cpu")) for k, v in self.optimizer.state[p].items()}
            for server, shard in enumerate(shards):
                self.transport.restore(server, self._step, shard)
        dist.barrier(group=self.group)

    def full_model(self) -> nn.Module | None:
        """Collective over the workers; on the first one, the model with the servers' final parameters."""
        dist.barrier(group=self.group)  # every worker's last push is in
        if not self.reports:
            return None
        self._pull()
        return self.model

    # --- servers -------------------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer the workers until every one is done; then server 0 writes the clock records."""
        assert self.server is not None and self.transport is not None
        self.server.wait_done()
        if self.ctx.rank == 0:
            records = list(self.server.records)
            for server in range(1, self.servers):
                records += self.transport.records(server)
            self._write_clocks(records)

    def finish(self) -> None:
        assert self.transport is not None
        if self.is_trainer:
            for server in range(self.servers):
                self.transport.done(server, self.ctx.rank)
        self.transport.shutdown()
        ps_transport.host(None)

    # --- helpers -------------------------------------------------------------------------------------------------

    def _pull(self, with_optimizer: bool = False) -> None:
        assert self.model is not None and self.optimizer is not None and self.transport is not None
        pulls = [self.transport.pull(s, with_optimizer) for s in range(self.servers)]
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for pull in pulls:
                shard = pull.wait()
                for name, value in shard["params"].items():
                    params[name].copy_(value)
                for name, state in shard["optim"].items():
                    p = params[name]
                    self.optimizer.state[p] = {k: _to(v, p.device) for k, v in state.items()}

    def _sync_buffers(self) -> None:
        assert self.model is not None
        for buffer in self.model.buffers():
            dist.broadcast(buffer, group=self.group, group_src=0)

    def _write_clocks(self, records: list[dict[str, int]]) -> None:
        data = {
            "mode": self.config.mode,
            "max_staleness": self.config.max_staleness if self.config.mode == "bounded" else None,
            "servers": self.servers,
            "workers": list(range(self.servers, self.ctx.world_size)),
            "records": records,
        }
        path = self.ctx.run_dir / CLOCKS_FILE
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(data))
        os.replace(partial, path)


def _to(value: Any, device: torch.device) -> Any:
    # Per-element state follows its parameter; scalars (Adam's step count) stay where the optimizer keeps them.
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value.detach().to(device)
    return value
