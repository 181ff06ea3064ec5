"""Registering a version by upload: ``POST /admin/v1/models/{name}/versions`` with the artifact's bytes as the body.

The body is streamed to a file in a scratch folder of the artifact store (never held whole in memory), its size
bounded by MAAS_MAX_REQUEST_BYTES and its sha256 computed on the way; a client's ``X-Maas-Sha256`` must match it.
Then the file takes the same path as ``maas models register``: :meth:`Registry.register`, with its format checks,
digest and lineage. A Hugging Face directory travels as the one zip the registry stores it as (the CLI packs it),
checked member by member when the server reads it. An upload cut off midway registers nothing, and its scratch
folder is removed (or left for ``maas gc`` if the server dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from fastapi import Query, Request, Response
from starlette.requests import ClientDisconnect

from maas.errors import InvalidInput, PayloadTooLarge
from maas.registry import parse_ref, validate_alias
from maas.serving.api.admin.policy import actor, context, json_response, readable, registrable, run_in

#: The header naming the sha256 of the body (hex, or ``sha256:<hex>``), checked against what arrived.
DIGEST_HEADER = "x-maas-sha256"
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
#: A file name the client gives (so format detection and messages see ``model.onnx``); a single leaf, no path.
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FLUSH = 1 << 20
MAX_TAGS = 64
#: Registrations inspect whole models: a few at a time, on threads of their own, so that many uploads at once never
#: take the threads that key lookups and the other admin calls run on.
_REGISTERING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="maas-register")


class UploadCutOff(InvalidInput):
    """The client stopped sending before the whole body arrived."""


def _pairs(values: list[str], what: str) -> dict[str, str]:
    if len(values) > MAX_TAGS:
        raise InvalidInput(f"at most {MAX_TAGS} {what}s per version")
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{what} {v[:100]!r} is not KEY=VALUE; write e.g. {what}=team=vision")
        out[key] = val
    return out


def _metrics(values: list[str]) -> dict[str, float]:
    out = {}
    for key, val in _pairs(values, "metric").items():
        try:
            out[key] = float(val)
        except ValueError:
            raise InvalidInput(f"metric {key}={val[:50]}: the value must be a number") from None
    return out


def expected_digest(header: str | None) -> str | None:
    if header is None:
        return None
    m = _DIGEST.fullmatch(header.strip())
    if not m:
        raise InvalidInput(f"{DIGEST_HEADER} must be the body's sha256 as 64 hex digits (or sha256:<hex>)")
    return "sha256:" + m.group(1).lower()


def _write(fh: BinaryIO, h: hashlib._Hash, data: bytes) -> None:
    h.update(data)
    fh.write(data)


async def receive_file(request: Request, dest: Path, limit: int) -> tuple[str, int]:
    """Stream the request body into ``dest``; its ``sha256:<hex>`` digest and size. 413 past ``limit`` bytes (by
    Content-Length before anything is read, else as soon as that much arrived)."""

    def too_large(size: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the upload is {size:,} bytes or more, over the server's limit of {limit:,} (MAAS_MAX_REQUEST_BYTES)"
        )

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared))
    h = hashlib.sha256()
    size = 0
    buf = bytearray()
    fh = await asyncio.to_thread(dest.open, "xb")
    try:
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(size)
                buf += chunk
                if len(buf) >= _FLUSH:
                    await asyncio.to_thread(_write, fh, h, bytes(buf))
                    buf.clear()
        except ClientDisconnect:
            raise UploadCutOff(
                f"the upload stopped after {size:,} bytes, before the body ended; nothing was registered"
            ) from None
        if buf:
            await asyncio.to_thread(_write, fh, h, bytes(buf))
    finally:
        await asyncio.to_thread(fh.close)
    if size == 0:
        raise InvalidInput("the request body is empty: send the model file's bytes as the body")
    release = request.scope.get("maas.release_body")
    if callable(release):
        release()  # on disk now: the in-flight budget is for bodies held in memory
    return "sha256:" + h.hexdigest(), size


async def register(
    request: Request,
    name: str,
    alias: str | None = Query(None, max_length=63, description="Point this alias at the new version."),
    format: str | None = Query(None, max_length=32, description="onnx, torch_export, …; detected if omitted."),
    description: str = Query("", max_length=4096),
    parent: str | None = Query(None, max_length=300, description="URI of the version this one derives from."),
    tag: list[str] = Query([], description="KEY=VALUE, repeatable."),
    metric: list[str] = Query([], description="KEY=NUMBER, repeatable."),
    filename: str | None = Query(None, max_length=128, description="The file's name, e.g. model.onnx."),
) -> Response:
    """Register the request body (the artifact's bytes) as the next version of ``name``; 201 with the version."""
    registrable(name)
    if alias is not None:
        validate_alias(alias)
    if parent is not None:
        readable(parse_ref(parent).name)  # a parent the caller may not see reads as missing
    tags, metrics = _pairs(tag, "tag"), _metrics(metric)
    expected = expected_digest(request.headers.get(DIGEST_HEADER))
    leaf = filename if filename and _FILENAME.fullmatch(filename) else "upload"
    ctx = context(request)
    reg = ctx.registry
    # The scratch folder is made, and removed, under the artifact store's lock: off the event loop.
    scratch = contextlib.ExitStack()
    folder: Path = await asyncio.to_thread(scratch.enter_context, reg.artifacts.scratch())
    try:
        path = folder / leaf
        digest, _ = await receive_file(request, path, ctx.settings.max_request_bytes)
        if expected is not None and expected != digest:
            raise InvalidInput(
                f"the upload's sha256 is {digest}, not the {expected} the client sent ({DIGEST_HEADER}): it was "
                "changed or cut on the way; nothing was registered, send it again"
            )
        mv = await run_in(
            _REGISTERING,
            request,
            reg.register,
            path,
            name,
            format=format,
            description=description,
            tags=tags,
            metrics=metrics,
            alias=alias,
            parent=parent,
            creator=actor(),
        )
    finally:
        await asyncio.to_thread(scratch.close)
    return json_response(mv.to_dict(), status=201)
