"""The admin API's JSON request bodies: read within a small bound, parsed strictly (unknown fields refused)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maas.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

#: The largest JSON body an admin endpoint reads; its bodies are a few fields.
MAX_JSON_BYTES = 64 * 1024

Body = TypeVar("Body", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AliasBody(_Strict):
    version: int = Field(ge=1, le=2**31 - 1)


class DeployBody(_Strict):
    #: Settings to change, by name (max_batch_size, …); the rest keep their values (with ``reset``: the defaults).
    settings: dict[str, Any] = Field(default_factory=dict, max_length=32)
    reset: bool = False


_COUNT = 2**53  # what every JSON reader still reads exactly


class LimitsBody(_Strict):
    rpm: int | None = Field(None, ge=0, le=_COUNT)
    tpm: int | None = Field(None, ge=0, le=_COUNT)
    concurrent: int | None = Field(None, ge=0, le=_COUNT)
    requests_per_day: int | None = Field(None, ge=0, le=_COUNT)
    tokens_per_month: int | None = Field(None, ge=0, le=_COUNT)


class KeyBody(_Strict):
    name: str = Field(max_length=128)
    role: str = Field(max_length=16)
    models: list[str] = Field(default_factory=list, max_length=256)
    #: ``30d``, ``12h`` from now, or an ISO date or time; None: never.
    expires: str | None = Field(None, max_length=64)
    limits: LimitsBody = LimitsBody()


def openapi_body(cls: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of an endpoint that reads ``cls`` with :func:`read_json` (nested models inlined,
    so the schema stands alone)."""
    schema = cls.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            return inline(defs[ref.rsplit("/", 1)[-1]]) if ref else {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


async def read_json(request: Request, cls: type[Body]) -> Body:
    """The request's JSON body as ``cls``: 415 when it is not JSON, 413 past :data:`MAX_JSON_BYTES` (the rest is
    never read), 400 naming the fields at fault."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json":
        raise UnsupportedMediaType(f"the body must be JSON (Content-Type: application/json), not {media[:100]!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"the request body is {int(declared):,} bytes, over {MAX_JSON_BYTES:,} for JSON here")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise PayloadTooLarge(f"the request body goes over {MAX_JSON_BYTES:,} bytes, the limit for JSON here")
        chunks.append(chunk)
    try:
        data = orjson.loads(b"".join(chunks) or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON ({exc})") from None
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors(include_url=False)[:5]
        )
        raise InvalidInput(f"invalid request body: {problems}") from None


def moment(text: str, parse: Callable[[str], datetime], what: str) -> datetime:
    """``parse(text)`` as an aware UTC time; a time the calendar cannot hold (``9999999w``, year 1 in another zone)
    is a 400 naming ``what``, not an overflow."""
    try:
        at = parse(text)
        return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidInput(
            f"{what} {text[:64]!r} is out of the calendar's range; give a time from year 1 to 9999"
        ) from None
