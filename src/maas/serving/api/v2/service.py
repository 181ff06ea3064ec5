"""Open Inference Protocol v2 operations, independent of the web framework: the router calls these."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from maas import __version__
from maas.errors import InvalidInput, MaasError, PayloadTooLarge, RateLimited, Unavailable
from maas.registry import validate_name
from maas.registry.uri import parse_version
from maas.serving import memory
from maas.serving.api.v2 import protocol
from maas.serving.errors import public_message
from maas.serving.manager import LoadedModel, Loading, ModelManager
from maas.serving.metrics import UNKNOWN, ServerMetrics
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)

EXTENSIONS = ["binary_tensor_data"]
#: Bodies over this size (and every compressed body) count as heavy: at most ``max_concurrent_decodes`` at once.
HEAVY_BODY_BYTES = 256 * 1024


class V2Service:
    def __init__(
        self,
        manager: ModelManager,
        metrics: ServerMetrics,
        executor: ThreadPoolExecutor,
        settings: ServerSettings | None = None,
        *,
        load_wait_s: float | None = None,
    ) -> None:
        settings = settings or ServerSettings()
        self.manager = manager
        self.metrics = metrics
        self.executor = executor
        self.load_wait_s = settings.load_wait_s if load_wait_s is None else load_wait_s
        self.limits = settings.limits
        self.max_heavy = settings.max_concurrent_decodes
        self._heavy = 0  # heavy decodes running; touched only on the event loop

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "maas", "version": __version__, "extensions": EXTENSIONS}

    async def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        validate_name(name)

        def work() -> dict[str, Any]:
            reg = self.manager.registry
            self.manager.check_served(name)
            if version is None:
                mv = self.manager.serving_version(name) or reg.resolve(name)
            else:
                mv = reg.get_version(name, parse_version(version))
            versions = [str(v.version) for v in reg.list_versions(name)]
            return protocol.model_metadata(name, versions, mv.format, mv.signature) | {"version": str(mv.version)}

        result: dict[str, Any] = await self._run(work)
        return result

    async def model_ready(self, name: str, version: str | None) -> tuple[bool, str]:
        validate_name(name)
        result: tuple[bool, str] = await self._run(self.manager.model_ready, name, version)
        return result

    async def acquire(self, name: str, version: str | None) -> LoadedModel:
        """The loaded model for a request; waits (without holding a thread) up to ``load_wait_s`` for a
        load in progress, then answers 503."""
        deadline = time.monotonic() + self.load_wait_s
        while True:
            try:
                loaded: LoadedModel = await self._run(self.manager.lookup, name, version)
                return loaded
            except Loading as loading:
                while not loading.event.is_set():
                    if time.monotonic() >= deadline:
                        raise Unavailable(f"{loading.what} is loading; retry shortly") from None
                    await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def _decode_slot(self, heavy: bool) -> AsyncIterator[None]:
        """Admit a heavy decode only while fewer than ``max_concurrent_decodes`` run; else 429 at once."""
        if not heavy:
            yield
            return
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

    async def infer(
        self, name: str, version: str | None, body: bytes, header_length: int | None, encoding: str = "identity"
    ) -> tuple[bytes, dict[str, str]]:
        """Decode, run and encode one request; ``encoding`` is its Content-Encoding (identity, gzip or deflate)."""
        started = time.perf_counter()
        label_name, label_version = UNKNOWN, ""
        heavy = len(body) > HEAVY_BODY_BYTES or encoding != "identity"
        try:
            validate_name(name)
            if self.manager.knows(name):
                label_name = name
            loaded = await self.acquire(name, version)
            label_name, label_version = loaded.name, str(loaded.version)
            result: tuple[bytes, dict[str, str]]
            if heavy:  # decoded under the cap, then run: two hops to a thread
                async with self._decode_slot(heavy):
                    request = await self._run(self._decode, loaded, body, header_length, encoding)
                del body
                result = await self._run(self._infer, loaded, request)
            else:  # a small body: decoded and run in one hop
                result = await self._run(self._decode_and_infer, loaded, body, header_length)
        except BaseException as exc:
            self.metrics.observe_request(label_name, label_version, time.perf_counter() - started, exc)
            raise
        finally:
            if heavy:  # off the loop: malloc_trim walks the heap (ctypes releases the GIL meanwhile)
                asyncio.get_running_loop().run_in_executor(None, memory.trim)
        self.metrics.observe_request(label_name, label_version, time.perf_counter() - started, None)
        return result

    def _decode(
        self, loaded: LoadedModel, body: bytes, header_length: int | None, encoding: str
    ) -> protocol.DecodedRequest:
        if encoding != "identity":
            body = inflate(body, encoding, self.limits.max_inflated_bytes)
        return protocol.decode_request(body, header_length, loaded.version_info.signature, self.limits)

    def _decode_and_infer(
        self, loaded: LoadedModel, body: bytes, header_length: int | None
    ) -> tuple[bytes, dict[str, str]]:
        return self._infer(loaded, self._decode(loaded, body, header_length, "identity"))

    def _infer(self, loaded: LoadedModel, req: protocol.DecodedRequest) -> tuple[bytes, dict[str, str]]:
        uri = loaded.version_info.uri
        try:
            outputs = loaded.runtime.infer(req.inputs, req.requested_outputs)
        except MaasError:
            raise
        except MemoryError:
            raise Unavailable(f"{uri} ran out of memory on this request; send smaller batches") from None
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # Rust extensions (tokenizers, safetensors) panic with a BaseException
            # The inputs matched the signature, so this is almost always data the model cannot take (an index
            # out of range, a dimension the graph fixes); the model's own words say which. Logged in full.
            log.info("%s failed on a request: %s: %s", uri, type(exc).__name__, exc)
            raise InvalidInput(
                f"{uri} cannot run on these inputs: {public_message(f'{type(exc).__name__}: {exc}')}"
            ) from exc
        self.limits.check_outputs(uri, outputs)
        return protocol.encode_response(
            loaded.name, str(loaded.version), req.id, outputs, req.binary, self.limits.max_output_bytes
        )


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression) up to ``limit`` bytes.

    The stream must end cleanly: complete (a gzip trailer, whose CRC and length zlib checks) and with
    nothing after it.
    """
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(
            f"request body inflates to over the limit of {limit:,} bytes (MAAS_MAX_INFLATED_BYTES); send smaller "
            "batches"
        )
    if not inflater.eof:
        raise InvalidInput(f"request body is a truncated {encoding} stream; send the whole compressed body")
    if inflater.unused_data:
        raise InvalidInput(
            f"request body has {len(inflater.unused_data)} bytes after the end of its {encoding} stream; "
            "send exactly one compressed stream"
        )
    return out
