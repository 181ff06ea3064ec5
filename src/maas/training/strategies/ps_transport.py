"""How workers reach the parameter servers: the :class:`Transport` protocol and its ``torch.distributed.rpc`` form.

Everything that crosses the wire is tensors and plain values (dicts, ints, floats). Server ``i`` is rank ``i``;
each server process hosts one :class:`~maas.training.strategies.ps_server.ParameterServer`, registered with
:func:`host` before RPC starts so that no push can arrive before it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Protocol
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc
from torch.distributed.rendezvous import register_rendezvous_handler

from maas.training.stores import Store, TCPStore
from maas.training.strategies.ps_server import Grads, ParameterServer, Shard

#: pushes may be held for as long as the slowest worker needs (sync, bounded); the launcher ends a failed job
_NO_TIMEOUT = 0


class Transport(Protocol):
    def push(self, server: int, worker: int, step: int, lr: float, grads: Grads) -> torch.futures.Future[None]:
        """Hand ``grads`` of ``worker``'s ``step`` to ``server``; completes when the worker may start its next step."""

    def pull(self, server: int, with_optimizer: bool = False) -> torch.futures.Future[Shard]:
        """The server's current parameters (and optimizer state)."""

    def restore(self, server: int, step: int, shard: Shard) -> None:
        """Load a checkpointed shard into the server and set every worker's clock to ``step``."""

    def done(self, server: int, worker: int) -> None:
        """Tell the server this worker will push no more."""

    def records(self, server: int) -> list[dict[str, int]]:
        """The server's clock records (see :mod:`ps_server`)."""

    def shutdown(self) -> None:
        """Leave the transport; collective over all ranks."""


# --- the server side: module-level functions RPC can name --------------------------------------------------------

_hosted: ParameterServer | None = None


def host(server: ParameterServer | None) -> None:
    """Make ``server`` the one this process's RPC handlers serve (None to stop)."""
    global _hosted
    _hosted = server


def _server() -> ParameterServer:
    if _hosted is None:
        raise RuntimeError(f"no parameter server is hosted in process {os.getpid()}; this rank is not a server")
    return _hosted


@rpc.functions.async_execution
def _push(worker: int, step: int, lr: float, grads: Grads) -> torch.futures.Future[None]:
    return _server().push(worker, step, lr, grads)


def _pull(with_optimizer: bool) -> Shard:
    return _server().pull(with_optimizer)


def _restore(step: int, shard: Shard) -> None:
    _server().restore(step, shard)


def _done(worker: int) -> None:
    _server().done(worker)


def _records() -> list[dict[str, int]]:
    return _server().records


# --- the client side ---------------------------------------------------------------------------------------------


def _name(rank: int) -> str:
    return f"rank{rank}"


class RpcTransport:
    """:class:`Transport` over ``torch.distributed.rpc`` (TensorPipe). :meth:`start` is collective over all ranks."""

    @classmethod
    def start(cls, rank: int, world_size: int) -> RpcTransport:
        """Join RPC on every rank of the default process group, rendezvousing over a store of its own."""
        global _rpc_store, _registered
        _rpc_store = _store(rank, world_size)
        if not _registered:
            register_rendezvous_handler(_SCHEME, _handler)
            _registered = True
        options = rpc.TensorPipeRpcBackendOptions(init_method=f"{_SCHEME}://")
        with _quiet():
            rpc.init_rpc(_name(rank), rank=rank, world_size=world_size, rpc_backend_options=options)
        return cls()

    def push(self, server: int, worker: int, step: int, lr: float, grads: Grads) -> torch.futures.Future[None]:
        return rpc.rpc_async(_name(server), _push, args=(worker, step, lr, grads), timeout=_NO_TIMEOUT)

    def pull(self, server: int, with_optimizer: bool = False) -> torch.futures.Future[Shard]:
        return rpc.rpc_async(_name(server), _pull, args=(with_optimizer,))

    def restore(self, server: int, step: int, shard: Shard) -> None:
        rpc.rpc_sync(_name(server), _restore, args=(step, shard))

    def done(self, server: int, worker: int) -> None:
        rpc.rpc_sync(_name(server), _done, args=(worker,))

    def records(self, server: int) -> list[dict[str, int]]:
        result: list[dict[str, int]] = rpc.rpc_sync(_name(server), _records)
        return result

    def shutdown(self) -> None:
        """Leave RPC; blocks until every rank has called it and all outstanding calls are answered."""
        global _rpc_store
        with _quiet():
            rpc.shutdown(graceful=True)
        _rpc_store = None


# --- rendezvous --------------------------------------------------------------------------------------------------
# RPC's own tcp:// rendezvous cannot be used under torchrun's elastic agent: there it expects the agent to host
# the store, which the agent does only at MASTER_PORT. So RPC rendezvouses over a store of this job's own, handed
# to it through a rendezvous handler for a scheme of our own (the public way to give init_rpc a store).

_SCHEME = "maas-ps"
_registered = False
_rpc_store: Store | None = None


def _store(rank: int, world_size: int) -> Store:
    """A fresh TCPStore: rank 0 hosts it on a port the OS picks and broadcasts the port over the default group."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")  # rank 0's host under torchrun
    timeout = timedelta(minutes=10)
    store = None
    port = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        store = TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        port += store.port
    if dist.get_backend() == "nccl":
        port = port.cuda()
    dist.broadcast(port, src=0)
    if store is None:
        store = TCPStore(host, int(port.item()), world_size, is_master=False, timeout=timeout)
    return store


def _handler(url: str, **kwargs: Any) -> Iterator[tuple[Store, int, int]]:
    query = dict(part.split("=", 1) for part in urlparse(url).query.split("&") if part)
    if _rpc_store is None:
        raise RuntimeError(f"{_SCHEME}:// rendezvous outside RpcTransport.start")
    yield _rpc_store, int(query["rank"]), int(query["world_size"])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """RPC's own bookkeeping collectives trip a deprecation warning inside torch; it is not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You are using a Backend .* as a ProcessGroup", category=UserWarning)
        yield
