"""Debris: what interrupted registrations and loads leave in ``MAAS_HOME``, found and removed.

- artifacts no version references (a registration killed between storing its artifact and committing
  its version, or a version deleted while its file could not be removed);
- temporary uploads and scratch folders in the artifact store's ``tmp/`` that no running process holds
  (:mod:`maas.registry.inuse`);
- Hugging Face extractions (``cache/hf/.extract-*``) untouched for :data:`EXTRACTION_GRACE_S`, and
  extracted folders (``cache/hf/<hex>-<size>``) of artifacts no version references;
- GGUF conversions (``cache/causal_lm/<hex>``) of artifacts no version references, their lock files, conversions
  a dead process left (``.convert-*``, untouched for :data:`EXTRACTION_GRACE_S`) and folders set aside
  (``.discard-*``);
- plaintext copies of encrypted artifacts (``cache/decrypted/sha256/<2>/<hex>``) and downloaded copies of S3 objects
  (``cache/s3/sha256/<2>/<hex>`` and its ``.etag``) no version references.

Everything is decided and removed under the artifact store's exclusive guard. A registration holds the
guard (shared) from storing its artifact until its version row is committed, and creates and locks its
temporaries under it, so nothing a live registration uses is ever taken. Extractions carry no lock, so
only old ones count.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maas.registry import inuse
from maas.registry.artifacts import ArtifactStore
from maas.registry.entities import Debris, GcResult
from maas.registry.store import MetadataStore

log = logging.getLogger(__name__)

#: An extraction folder untouched (no file in it written) for this long belongs to a load that died.
EXTRACTION_GRACE_S = 3600.0
#: How ``maas.runtimes.hf.archive`` names a registry artifact's extraction: ``<sha256 hex>-<size>``.
_CACHE_NAME = re.compile(r"([0-9a-f]{64})-[0-9]+")
#: How ``maas.runtimes.causal_lm.gguf_cache`` names a GGUF's conversion (and its lock file): the GGUF's sha256 hex.
_CONVERTED_NAME = re.compile(r"\.?([0-9a-f]{64})(?:\.lock)?")
#: The name of a local copy of an artifact: its sha256 hex (``cache/decrypted/sha256/<2>/<hex>``, and
#: ``cache/s3/sha256/<2>/<hex>`` beside the ``<hex>.etag`` of the S3 object it was downloaded from).
_COPY_NAME = re.compile(r"([0-9a-f]{64})(?:\.etag)?")
#: A cache folder renamed for removal; only a collector (holding the exclusive guard) makes these.
_DOOMED = ".gc-"


@dataclass(frozen=True)
class _Found:
    debris: Debris
    remove: Callable[[], bool]  # False when it turned out to be in use


def find(store: MetadataStore, artifacts: ArtifactStore, home: Path) -> list[Debris]:
    """Every piece of debris, removing nothing."""
    with artifacts.guard(exclusive=True):
        found, _ = _scan(store, artifacts, home)
    return [f.debris for f in found]


def collect(store: MetadataStore, artifacts: ArtifactStore, home: Path, *, dry_run: bool = False) -> GcResult:
    """Remove every piece of debris (with ``dry_run``, only say what would go)."""
    with artifacts.guard(exclusive=True):
        found, in_use = _scan(store, artifacts, home)
        removed = []
        for f in found:
            if dry_run or f.remove():
                removed.append(f.debris)
                if not dry_run:
                    log.info("gc removed %s %s (%d bytes)", f.debris.kind, f.debris.path, f.debris.size)
            else:
                in_use += 1
    return GcResult(removed=tuple(removed), in_use=in_use, dry_run=dry_run)


def _scan(store: MetadataStore, artifacts: ArtifactStore, home: Path) -> tuple[list[_Found], int]:
    """What to remove, and how many temporaries were left because a process holds (or may hold) them."""
    now = time.time()
    referenced = store.referenced_digests()
    found: list[_Found] = []
    in_use = 0
    for digest in artifacts.digests():
        if digest not in referenced:
            found.append(
                _Found(_debris("artifact", artifacts.local_path(digest), home, now), _deleter(artifacts, digest))
            )
    for t in artifacts.temporaries():
        if t.in_use:
            in_use += 1
        else:
            found.append(
                _Found(_debris(t.kind, t.path, home, now), functools.partial(artifacts.remove_temporary, t.path))
            )
    cache = home / "cache" / "hf"
    if cache.is_dir():
        for entry in sorted(cache.iterdir()):
            if entry.name.startswith(_DOOMED):
                found.append(_Found(_debris("cache", entry, home, now), functools.partial(_rmtree, entry)))
            elif entry.name.startswith(".extract-"):
                debris = _debris("extraction", entry, home, now)
                if debris.age_s < EXTRACTION_GRACE_S or inuse.is_held(entry):
                    in_use += 1
                else:
                    found.append(_Found(debris, functools.partial(inuse.remove_unless_held, entry)))
            elif (m := _CACHE_NAME.fullmatch(entry.name)) and f"sha256:{m[1]}" not in referenced:
                found.append(_Found(_debris("cache", entry, home, now), functools.partial(_remove_cache, entry)))
    converted = home / "cache" / "causal_lm"
    if converted.is_dir():
        for entry in sorted(converted.iterdir()):
            name = entry.name
            if name.startswith((_DOOMED, ".discard-")):
                found.append(_Found(_debris("cache", entry, home, now), functools.partial(_rmtree, entry)))
            elif name.startswith(".convert-"):
                debris = _debris("extraction", entry, home, now)
                if debris.age_s < EXTRACTION_GRACE_S:
                    in_use += 1
                else:
                    found.append(_Found(debris, functools.partial(_rmtree, entry)))
            elif (m := _CONVERTED_NAME.fullmatch(name)) and f"sha256:{m[1]}" not in referenced:
                remove = _rmtree if name.startswith(".") else _remove_cache
                found.append(_Found(_debris("cache", entry, home, now), functools.partial(remove, entry)))
    for copies in (home / "cache" / "decrypted" / "sha256", home / "cache" / "s3" / "sha256"):
        if copies.is_dir():
            for entry in sorted(p for folder in copies.iterdir() if folder.is_dir() for p in folder.iterdir()):
                if (m := _COPY_NAME.fullmatch(entry.name)) and f"sha256:{m[1]}" not in referenced:
                    found.append(_Found(_debris("cache", entry, home, now), functools.partial(_unlink, entry)))
    return found, in_use


def _unlink(path: Path) -> bool:
    """Remove a local copy of an artifact that no version uses (read-only to its owner)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _deleter(artifacts: ArtifactStore, digest: str) -> Callable[[], bool]:
    def remove() -> bool:
        artifacts.delete(digest)
        return True

    return remove


def _remove_cache(path: Path) -> bool:
    # Renamed away first: a collector killed half-way must not leave a complete-looking extraction that
    # a later registration of the same bytes would use.
    doomed = path.with_name(f"{_DOOMED}{uuid.uuid4().hex}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return True
    return _rmtree(doomed)


def _rmtree(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return True


def _debris(kind: str, path: Path, home: Path, now: float) -> Debris:
    size, newest = _measure(path)
    try:
        shown = path.relative_to(home).as_posix()
    except ValueError:
        shown = str(path)
    return Debris(kind=kind, path=shown, size=size, age_s=max(0.0, now - newest))


def _measure(path: Path) -> tuple[int, float]:
    """Bytes in ``path`` (all files of a folder, links not followed) and its newest modification time."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0, 0.0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size, st.st_mtime
    size, newest = 0, st.st_mtime
    for current, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                st = os.lstat(os.path.join(current, name))
            except FileNotFoundError:
                continue
            newest = max(newest, st.st_mtime)
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
    return size, newest
