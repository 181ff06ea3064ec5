"""The serving engine: one request path for every API family.

A transport hands :meth:`Engine.infer` the model it names and a ``decode`` function that turns its body into an
:class:`~maas.serving.engine.types.InferRequest` once the model's signature is known; the engine finds the loaded
version (in memory, without a thread hop, once it is loaded), decodes (on the event loop for a small body, in a
thread under a cap for a heavy one), queues the request on that version's
:class:`~maas.serving.engine.scheduler.Scheduler` (dynamic batching, instances, a bounded queue, as its
deployment says), checks the outputs against the request limits and counts it in the metrics. Errors are
:class:`~maas.errors.MaasError`\\ s; each API family renders them its own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from maas import __version__
from maas.errors import InvalidInput, MaasError, RateLimited, Unavailable
from maas.registry import validate_name
from maas.registry.uri import parse_version
from maas.runtimes.base import Runtime, batches_rows, cost_bounded
from maas.serving import memory
from maas.serving.access.context import current_meter, meter_model, require_model
from maas.serving.engine.scheduler import BatchPolicy, Scheduler
from maas.serving.engine.types import InferRequest, InferResponse
from maas.serving.errors import public_message
from maas.serving.manager import LoadedModel, Loading, ModelManager
from maas.serving.metrics import UNKNOWN, ServerMetrics
from maas.serving.settings import ServerSettings
from maas.tensors import Signature, TensorSpec

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data"]

Decode = Callable[[Signature], InferRequest]
#: Bodies up to this size are decoded on the event loop (tens of microseconds); larger ones in a thread.
INLINE_DECODE_BYTES = 32 * 1024


@dataclass(frozen=True)
class ModelMetadata:
    """What ``GET /v2/models/{name}`` and gRPC ``ModelMetadata`` tell about a version."""

    name: str
    version: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def batchable(signature: Signature, runtime: Runtime | None = None) -> bool:
    """Whether requests to a model can be concatenated: every input and output has a dynamic first dimension, and
    the runtime (when given) declares that dimension one shared batch dimension (an ONNX graph whose inputs and
    outputs all start with the same named dimension, used nowhere else)."""
    specs = [*signature.inputs, *signature.outputs]
    shaped = bool(specs) and all(len(s.shape) >= 1 and s.shape[0] == -1 for s in specs)
    return shaped and (runtime is None or batches_rows(runtime))


class Engine:
    """See the module docstring. Created once per server process; used from its event loop only."""

    def __init__(
        self, manager: ModelManager, metrics: ServerMetrics, executor: ThreadPoolExecutor, settings: ServerSettings
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.executor = executor
        self.settings = settings
        self.limits = settings.limits
        self.load_wait_s = settings.load_wait_s
        self.max_heavy = settings.max_concurrent_decodes
        self._heavy = 0  # heavy decodes running (event loop only)
        self._inflight = 0  # inference requests between arrival and answer (event loop only)
        #: (name, version) -> the loaded model, its scheduler, and the stamp of the deployment it runs under.
        self._schedulers: dict[tuple[str, int], tuple[LoadedModel, Scheduler, object]] = {}

    # --- server and model state ----------------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "maas", "version": __version__, "extensions": EXTENSIONS}

    def server_ready(self) -> tuple[bool, str]:
        return self.manager.ready()

    async def model_ready(self, name: str, version: str | None) -> tuple[bool, str]:
        validate_name(name)
        require_model(name)
        if version is not None:
            parse_version(version)
        result: tuple[bool, str] = await self._thread(self.manager.model_ready, name, version)
        return result

    async def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        validate_name(name)
        require_model(name)

        def work() -> ModelMetadata:
            reg = self.manager.registry
            self.manager.check_served(name)
            if version is None:
                mv = self.manager.serving_version(name) or reg.resolve(name)
            else:
                mv = reg.get_version(name, parse_version(version))
            versions = [str(v.version) for v in reg.list_versions(name)]
            sig = mv.signature
            return ModelMetadata(name, str(mv.version), versions, mv.format, list(sig.inputs), list(sig.outputs))

        result: ModelMetadata = await self._thread(work)
        return result

    async def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """The version's configuration in Triton's form (``GET /v2/models/{name}/config``): its inputs and outputs
        and how it is deployed here (batching, queue, instances, threads)."""
        meta = await self.model_metadata(name, version)
        return triton_config(meta, self.manager.deployment(name))

    # --- inference -----------------------------------------------------------------------------

    async def acquire(self, name: str, version: str | None) -> LoadedModel:
        """The loaded version a request for ``name`` (and ``version``) runs on. In memory once loaded; otherwise
        the registry is asked in a thread, and a load in progress is waited for up to ``load_wait_s`` (then 503).
        A model the request's principal may not use is missing (404), whether it exists or not."""
        require_model(name)
        loaded = self.manager.find(name, version)
        if loaded is not None:
            return loaded
        deadline = time.monotonic() + self.load_wait_s
        while True:
            try:
                found: LoadedModel = await self._thread(self.manager.lookup, name, version)
                return found
            except Loading as loading:
                while not loading.event.is_set():
                    if time.monotonic() >= deadline:
                        raise Unavailable(f"{loading.what} is loading; retry shortly") from None
                    await asyncio.sleep(0.005)

    async def infer(
        self, name: str, version: str | None, decode: Decode, *, size: int = 0, heavy: bool = False
    ) -> tuple[LoadedModel, InferResponse]:
        """Run one request for ``name``: ``decode`` builds it from the transport's body (``size`` bytes) given the
        signature. A small body is decoded on the event loop; a larger one in a thread; a ``heavy`` one (large or
        compressed) in a thread, at most ``max_concurrent_decodes`` at once (else 429). Returns the version that
        ran it and the response."""
        started = time.perf_counter()
        label_name, label_version = UNKNOWN, ""
        self._inflight += 1
        try:
            validate_name(name)
            if version is not None:
                parse_version(version)
            loaded = await self.acquire(name, version)
            meter_model(loaded.name, loaded.version)  # known now, even if the request fails to decode
            label_name, label_version = loaded.name, str(loaded.version)
            signature = loaded.version_info.signature
            if heavy:
                async with self._decode_slot():
                    request = await self._thread(decode, signature)
            elif size > INLINE_DECODE_BYTES:
                request = await self._thread(decode, signature)
            else:
                request = decode(signature)
            outputs = await self._run(loaded, request)
            response = InferResponse(loaded.name, label_version, outputs, request.id)
        except BaseException as exc:
            if label_name == UNKNOWN and self.manager.knows(name):
                label_name = name
            self.metrics.observe_request(label_name, label_version, time.perf_counter() - started, exc)
            raise
        finally:
            self._inflight -= 1
        self.metrics.observe_request(label_name, label_version, time.perf_counter() - started, None)
        return loaded, response

    async def _run(self, loaded: LoadedModel, request: InferRequest) -> dict[str, np.ndarray]:
        scheduler = self.scheduler(loaded)
        meter = current_meter()
        if meter is not None:
            meter.model, meter.version = loaded.name, loaded.version
            meter.items += _rows(request.inputs)
        started = time.perf_counter()
        try:
            outputs = await scheduler.submit(request.inputs, request.outputs, alone=self._inflight == 1)
        finally:
            if meter is not None:
                meter.compute_s += time.perf_counter() - started
        self.limits.check_outputs(loaded.version_info.uri, outputs)
        count = getattr(loaded.runtime, "count_tokens", None)
        if meter is not None and count is not None:  # language and embedding models: tokens for usage and limits
            prompt, completion = await self._thread(count, request.inputs, outputs)
            meter.prompt_tokens += prompt
            meter.completion_tokens += completion
        return outputs

    def scheduler(self, loaded: LoadedModel) -> Scheduler:
        """The scheduler of ``loaded``, made on first use and kept in step with its deployment's revision."""
        key = (loaded.name, loaded.version)
        deployment = self.manager.deployment(loaded.name)
        entry = self._schedulers.get(key)
        # A revision alone could repeat when a model is deleted and registered again; with its time it cannot.
        stamp = (deployment.revision, deployment.updated_at)
        if entry is not None and entry[0] is loaded:
            if entry[2] != stamp:
                entry[1].set_policy(policy_of(deployment))
                self._schedulers[key] = (loaded, entry[1], stamp)
            return entry[1]
        # Another runtime under the same version (reloaded with other threads, or new bytes): the old scheduler
        # finishes the requests it holds, which alone keep it (and its runtime) alive.
        batch_size = self.metrics.batch_size.labels(loaded.name, str(loaded.version))
        scheduler = Scheduler(
            guarded_run(loaded),
            policy_of(deployment),
            self.executor,
            batchable=batchable(loaded.version_info.signature, loaded.runtime),
            what=loaded.version_info.uri,
            inline=cost_bounded(loaded.runtime),
            on_batch=lambda rows, _requests: batch_size.observe(rows),
        )
        self._schedulers[key] = (loaded, scheduler, stamp)
        return scheduler

    async def close(self) -> None:
        for _, scheduler, _ in list(self._schedulers.values()):
            await scheduler.close()
        self._schedulers.clear()

    def sweep(self) -> None:
        """Forget the schedulers of versions the manager let go (unloaded, deleted, replaced) once their queues are
        empty, so their runtimes can be freed. Called on the event loop every few seconds."""
        for key, (loaded, scheduler, _) in list(self._schedulers.items()):
            if not self.manager.holds(loaded) and scheduler.queued == 0 and scheduler.running == 0:
                del self._schedulers[key]

    # --- helpers -------------------------------------------------------------------------------

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @contextlib.asynccontextmanager
    async def _decode_slot(self) -> AsyncIterator[None]:
        if self._heavy >= self.max_heavy:
            raise RateLimited(
                f"{self._heavy} large or compressed requests are being decoded already "
                "(MAAS_MAX_CONCURRENT_DECODES); retry shortly, or send binary tensors"
            )
        self._heavy += 1
        try:
            yield
        finally:
            self._heavy -= 1
            # malloc_trim walks the heap; off the loop (ctypes releases the GIL meanwhile)
            asyncio.get_running_loop().run_in_executor(None, memory.trim)


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    """The rows (batch items) of a request: its first input's leading dimension, 1 for a scalar."""
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 0


def triton_config(meta: ModelMetadata, deployment: Any) -> dict[str, Any]:
    """Triton's model configuration JSON for ``meta`` as ``deployment`` serves it. With a batch dimension,
    ``max_batch_size`` is the deployment's and ``dims`` leave the batch dimension out, as in Triton."""
    batched = batchable(Signature(inputs=tuple(meta.inputs), outputs=tuple(meta.outputs)))

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        dims = list(spec.shape[1:] if batched else spec.shape)
        return {
            "name": spec.name,
            "data_type": "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}",
            "dims": dims,
        }

    config: dict[str, Any] = {
        "name": meta.name,
        "platform": meta.platform,
        "backend": meta.platform,
        "version_policy": {"specific": {"versions": [int(meta.version)]}},
        "max_batch_size": deployment.max_batch_size if batched else 0,
        "input": [tensor(s) for s in meta.inputs],
        "output": [tensor(s) for s in meta.outputs],
        "instance_group": [{"count": deployment.instances, "kind": "KIND_CPU"}],
        "parameters": {
            "threads": {"string_value": str(deployment.threads or "")},
            "deployment_revision": {"string_value": str(deployment.revision)},
        },
    }
    if batched and deployment.max_batch_size > 1:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(deployment.preferred_batch_sizes),
            "max_queue_delay_microseconds": round(deployment.max_queue_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": deployment.max_queue_size},
        }
    return config


def policy_of(deployment: Any) -> BatchPolicy:
    return BatchPolicy(
        max_batch_size=deployment.max_batch_size,
        max_queue_delay_s=deployment.max_queue_delay_ms / 1000.0,
        preferred_batch_sizes=tuple(deployment.preferred_batch_sizes),
        max_queue_size=deployment.max_queue_size,
        instances=deployment.instances,
    )


def guarded_run(loaded: LoadedModel) -> Callable[[Mapping[str, np.ndarray], Sequence[str] | None], Any]:
    """``loaded``'s runtime with its failures put in a client's terms (runs in a worker thread)."""
    runtime, uri = loaded.runtime, loaded.version_info.uri

    def run(inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None) -> dict[str, np.ndarray]:
        try:
            return runtime.infer(inputs, outputs)
        except MaasError:
            raise
        except MemoryError:
            raise Unavailable(f"{uri} ran out of memory on this request; send smaller batches") from None
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # Rust extensions (tokenizers, safetensors) panic with a BaseException
            # The inputs matched the signature, so this is almost always data the model cannot take (an index out
            # of range, a dimension the graph fixes); the model's own words say which. Logged in full.
            log.info("%s failed on a request: %s: %s", uri, type(exc).__name__, exc)
            raise InvalidInput(
                f"{uri} cannot run on these inputs: {public_message(f'{type(exc).__name__}: {exc}')}"
            ) from exc

    return run
