"""Content-addressed artifact storage.

An artifact is stored under its sha256: written to a temporary file, flushed to disk and renamed into
place, so a reader never sees a partial file. The registry commits the database row only after
:meth:`ArtifactStore.put` returns, so a crash never leaves a version whose artifact is half written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from maas.errors import InvalidInput

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file's content."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


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


class LocalArtifactStore:
    """Artifacts as files under ``root/sha256/<2 hex>/<64 hex>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._clear_stale_uploads()

    @contextlib.contextmanager
    def guard(self, *, exclusive: bool) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _clear_stale_uploads(self, older_than_s: float = 3600.0) -> None:
        """Remove uploads a crash left behind (never visible as versions); recent ones may be in flight."""
        if not self._tmp.is_dir():
            return
        cutoff = time.time() - older_than_s
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()

    def _path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise InvalidInput(f"malformed artifact digest {digest!r}")
        return self.root / "sha256" / hexdigest[:2] / hexdigest

    def put(self, source: Path) -> tuple[str, int]:
        if not source.is_file():
            raise InvalidInput(f"{source} is not a file; register a model file such as model.onnx or model.pt2")
        self._tmp.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="upload-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
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
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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
