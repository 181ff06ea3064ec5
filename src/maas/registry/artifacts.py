"""Content-addressed artifact storage.

An artifact is stored under its sha256: written to a temporary file, flushed to disk and renamed into
place, so a reader never sees a partial file. The registry commits the database row only after
:meth:`ArtifactStore.put` returns, so a crash never leaves a version whose artifact is half written.

What a crash does leave (a temporary upload, a scratch folder, an artifact stored but never
referenced) stays findable: temporaries live in the store's ``tmp/``, each locked by the process using
it (:mod:`maas.registry.inuse`), and ``maas gc`` removes them once no process holds them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from maas.errors import InvalidInput
from maas.registry import inuse

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file's content."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


#: Temporaries a dead process left are removed when a store opens once they are this old (``maas gc``
#: removes them at any age).
STALE_TEMPORARY_S = 3600.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Temporary:
    """A file or folder in the store's temporary area."""

    path: Path
    kind: str  # "upload" (an artifact being stored) or "scratch" (a folder an artifact is prepared in)
    in_use: bool  # a running process holds it


class ArtifactStore(Protocol):
    """Where artifact bytes live. The local store is the embedded default; an object store can follow."""

    def put(self, source: Path) -> tuple[str, int]:
        """Store a file; return its ``sha256:<hex>`` digest and size in bytes."""
        ...

    def local_path(self, digest: str) -> Path:
        """A local file holding the artifact (it may not exist, or may be corrupt: see :meth:`check`)."""
        ...

    def check(self, digest: str) -> str | None:
        """The actual digest of the stored bytes, or None when the artifact is missing."""
        ...

    def delete(self, digest: str) -> None: ...

    def guard(self, *, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        """Held (shared) by writers from storing an artifact until its version is committed, and
        (exclusive) by deleters from deciding an artifact is unused until it is gone: so a delete never
        removes bytes that a concurrent registration of the same content is about to reference."""
        ...

    def scratch(self) -> contextlib.AbstractContextManager[Path]:
        """A new empty local folder to prepare an artifact in (e.g. pack a directory into one file),
        removed on exit. It is marked in use while open, and left for ``maas gc`` if the process dies."""
        ...

    def digests(self) -> list[str]:
        """The digest of every stored artifact."""
        ...

    def temporaries(self) -> list[Temporary]:
        """Every temporary upload and scratch folder, and whether a running process holds it."""
        ...

    def remove_temporary(self, path: Path) -> bool:
        """Remove one of :meth:`temporaries` unless a process holds it; ``True`` when it is gone."""
        ...


class LocalArtifactStore:
    """Artifacts as files under ``root/sha256/<2 hex>/<64 hex>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._clear_stale_temporaries()

    @contextlib.contextmanager
    def guard(self, *, exclusive: bool) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _clear_stale_temporaries(self) -> None:
        """Remove the old temporaries of dead processes, when no one holds the guard (never waiting for it)."""
        if not self._tmp.is_dir():
            return
        cutoff = time.time() - STALE_TEMPORARY_S
        with contextlib.suppress(OSError), (self.root / ".lock").open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            for t in self.temporaries():
                with contextlib.suppress(OSError):
                    if not t.in_use and t.path.lstat().st_mtime < cutoff:
                        self.remove_temporary(t.path)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        self._tmp.mkdir(parents=True, exist_ok=True)
        # Created and locked under the shared guard: a collector (exclusive guard) never sees it unlocked.
        with self.guard(exclusive=False):
            path = Path(tempfile.mkdtemp(dir=self._tmp, prefix="scratch-"))
            fd = inuse.hold(path)
        try:
            yield path
        finally:
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)

    def digests(self) -> list[str]:
        base = self.root / "sha256"
        if not base.is_dir():
            return []
        return sorted(
            f"sha256:{f.name}"
            for shard in base.iterdir()
            if shard.is_dir()
            for f in shard.iterdir()
            if _HEX64.fullmatch(f.name) and f.name[:2] == shard.name
        )

    def temporaries(self) -> list[Temporary]:
        if not self._tmp.is_dir():
            return []
        return [
            Temporary(p, "upload" if p.name.startswith("upload-") else "scratch", inuse.is_held(p))
            for p in sorted(self._tmp.iterdir())
        ]

    def remove_temporary(self, path: Path) -> bool:
        if path.parent != self._tmp:
            raise InvalidInput(f"{path} is not in the artifact store's temporary folder {self._tmp}")
        return inuse.remove_unless_held(path)

    def _path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise InvalidInput(f"malformed artifact digest {digest!r}")
        return self.root / "sha256" / hexdigest[:2] / hexdigest

    def put(self, source: Path) -> tuple[str, int]:
        if not source.is_file():
            raise InvalidInput(f"{source} is not a file; register a model file such as model.onnx or model.pt2")
        self._tmp.mkdir(parents=True, exist_ok=True)
        # Under the shared guard (as is the caller's commit): a collector never takes the upload, nor the
        # stored file before its version row exists.
        with self.guard(exclusive=False):
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="upload-")
            tmp = Path(tmp_name)
            with os.fdopen(fd, "wb") as out:
                fcntl.flock(out, fcntl.LOCK_EX)  # held until closed; a crash releases it (maas.registry.inuse)
                try:
                    return self._write(source, out, tmp)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise

    def _write(self, source: Path, out: BinaryIO, tmp: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        with source.open("rb") as src:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
        digest = "sha256:" + h.hexdigest()
        final = self._path(digest)
        if final.exists() and self.check(digest) == digest:
            tmp.unlink()
            return digest, size
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return digest, size

    def local_path(self, digest: str) -> Path:
        return self._path(digest)

    def check(self, digest: str) -> str | None:
        path = self._path(digest)
        if not path.is_file():
            return None
        return sha256_file(path)

    def delete(self, digest: str) -> None:
        path = self._path(digest)
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
