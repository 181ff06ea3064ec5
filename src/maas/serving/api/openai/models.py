"""Which registry models the OpenAI API serves, and the loaded version a request's ``model`` names.

A ``model`` is a registry reference: ``NAME`` (the version the server serves the name at, following its
``production`` alias), ``NAME@ALIAS`` (the alias is resolved through the registry on each request, the answer kept
for :data:`ALIAS_TTL_S`, so an alias move switches models as it does everywhere else) or ``NAME/VERSION``.
Registry reads run in the serving threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from maas.errors import InvalidInput, NotFound
from maas.registry.uri import ModelRef, parse_ref
from maas.serving.access.context import current_principal, not_registered
from maas.serving.api.openai.protocol import ModelNotFound
from maas.serving.context import ServingContext
from maas.serving.manager import LoadedModel

#: Formats the OpenAI API serves: language models on the completion endpoints, embedding models on embeddings.
GENERATIVE = "causal_lm"
EMBEDDING = "hf_transformers"
FORMATS = (GENERATIVE, EMBEDDING)
#: How long an alias's resolution is reused.
ALIAS_TTL_S = 0.5
MAX_CACHED_ALIASES = 1024

T = TypeVar("T")


class ModelDirectory:
    """The OpenAI API's view of the registry, for one server (its alias cache lives here)."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self._aliases: dict[tuple[str, str], tuple[int, float]] = {}

    async def _thread(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.ctx.executor, fn)

    def _ref(self, model: str) -> ModelRef:
        try:
            ref = parse_ref(model)
        except InvalidInput as exc:
            raise ModelNotFound(f"the model {model!r} does not exist: {exc}") from None
        if not current_principal().sees(ref.name):
            raise ModelNotFound(f"{not_registered(ref.name)}; GET /v1/models lists the models served here")
        return ref

    async def acquire(self, model: str) -> LoadedModel:
        """The loaded version ``model`` names (:class:`ModelNotFound` if there is none)."""
        ref = self._ref(model)
        try:
            if ref.alias is not None:
                version = await self._alias(ref.name, ref.alias)
                return await self.ctx.engine.acquire(ref.name, str(version))
            return await self.ctx.engine.acquire(ref.name, None if ref.version is None else str(ref.version))
        except NotFound as exc:
            raise ModelNotFound(f"{exc}; GET /v1/models lists the models served here") from None

    async def _alias(self, name: str, alias: str) -> int:
        now = time.monotonic()
        cached = self._aliases.get((name, alias))
        if cached is not None and now - cached[1] < ALIAS_TTL_S:
            return cached[0]

        def resolve() -> int:
            self.ctx.manager.check_served(name)
            return self.ctx.registry.resolve(ModelRef(name, alias=alias)).version

        version = await self._thread(resolve)
        if len(self._aliases) >= MAX_CACHED_ALIASES:
            self._aliases.clear()
        self._aliases[(name, alias)] = (version, time.monotonic())
        return version

    async def listing(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: every served model of a format the OpenAI API serves, by name."""

        principal = current_principal()  # read here: the thread below does not see the request's context

        def work() -> list[dict[str, Any]]:
            registry, only = self.ctx.registry, self.ctx.manager.only
            created = {m.name: m.created_at for m in registry.list_models()}
            out = []
            for target in registry.serving_targets():
                if target.version is None or (only is not None and target.name not in only):
                    continue
                if not principal.sees(target.name):
                    continue
                try:
                    version = registry.get_version(target.name, target.version)
                except NotFound:
                    continue  # deleted since the listing
                if version.format in FORMATS:
                    stamp = created.get(target.name, version.created_at)
                    out.append(describe(target.name, int(stamp.timestamp())))
            return sorted(out, key=lambda m: str(m["id"]))

        return await self._thread(work)

    async def describe(self, model: str) -> dict[str, Any]:
        """``GET /v1/models/{model}``: ``model`` if it names a version the OpenAI API serves."""
        ref = self._ref(model)

        def work() -> dict[str, Any]:
            self.ctx.manager.check_served(ref.name)
            version = self.ctx.registry.resolve(ref)
            if version.format not in FORMATS:
                raise ModelNotFound(
                    f"{version.uri} is a {version.format} model, served by the Open Inference Protocol "
                    f"(/v2/models/{ref.name}), not the OpenAI API"
                )
            stamp = self.ctx.registry.get_model(ref.name).created_at
            return describe(model, int(stamp.timestamp()))

        try:
            return await self._thread(work)
        except NotFound as exc:
            if isinstance(exc, ModelNotFound):
                raise
            raise ModelNotFound(str(exc)) from None


def describe(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "maas"}


def served_at(loaded: LoadedModel) -> str:
    """The ``model`` of responses: the version that computed them, as ``NAME/VERSION`` (send it back to pin it)."""
    return f"{loaded.name}/{loaded.version}"


def require_format(loaded: LoadedModel, wanted: str) -> None:
    """Refuse a model of another format than an endpoint serves, saying which endpoint serves it."""
    fmt = loaded.version_info.format
    if fmt == wanted:
        return
    where = {
        GENERATIVE: "/v1/chat/completions and /v1/completions",
        EMBEDDING: "/v1/embeddings",
    }.get(fmt, f"the Open Inference Protocol (/v2/models/{loaded.name}/infer)")
    kind = {GENERATIVE: "a language model", EMBEDDING: "an embedding model"}.get(fmt, f"a {fmt} model")
    raise InvalidModel(f"{loaded.version_info.uri} is {kind}; it is served at {where}")


class InvalidModel(InvalidInput):
    param = "model"
    code = "invalid_model"
