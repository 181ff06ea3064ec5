"""Content-addressed artifact storage.

An artifact is stored under its sha256: written to a temporary file, flushed to disk and renamed into
place, so a reader never sees a partial file. The registry commits the database row only after
:meth:`ArtifactStore.put` returns, so a crash never leaves a version whose artifact is half written.

What a crash does leave (a temporary upload, a scratch folder, an artifact stored but never
referenced) stays findable: temporaries live in the store's ``tmp/``, each locked by the process using
it (:mod:`maas.registry.inuse`), and ``maas gc`` removes them once no process holds them.

With a key (``MAAS_ARTIFACT_KEY_FILE``), artifacts are written encrypted (:mod:`maas.registry.encryption`); the
digest stays the sha256 of the plaintext, and a store with a key still reads the plaintext artifacts it holds from
before (told apart by the encrypted format's magic bytes). A runtime loads from a plaintext copy that
:meth:`LocalArtifactStore.fetch` decrypts, on every verified load, into a private folder outside the store
(``MAAS_HOME/cache/decrypted``, 0700; copies read-only to their owner), replacing the copy atomically only once the
plaintext's digest matched. A copy is removed with its artifact (a deleted version, ``maas gc``); scratch folders
and decryptions in progress live there too (its ``tmp/``), so no plaintext is ever written under the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from maas.errors import ArtifactIntegrityError, InvalidInput
from maas.registry import encryption, inuse
from maas.registry.encryption import ArtifactKey, ArtifactKeyError

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


class ArtifactMissing(ArtifactIntegrityError):
    """The store holds no file for the digest."""


class DigestMismatch(ArtifactIntegrityError):
    """The stored content's sha256 is not the digest it is stored under."""

    def __init__(self, actual: str) -> None:
        super().__init__(f"its content's digest is {actual}")
        self.actual = actual


@dataclass(frozen=True)
class Temporary:
    """A file or folder in the store's temporary area."""

    path: Path
    kind: str  # "upload" (an artifact being stored) or "scratch" (a folder an artifact is prepared in)
    in_use: bool  # a running process holds it


class ArtifactStore(Protocol):
    """Where artifact bytes live: a local folder (the embedded default) or an S3 bucket, chosen by
    ``MAAS_ARTIFACTS_URL`` (:mod:`maas.registry.artifact_stores`)."""

    def put(self, source: Path) -> tuple[str, int]:
        """Store a file; return its ``sha256:<hex>`` digest and size in bytes."""
        ...

    def local_path(self, digest: str) -> Path:
        """Where the artifact's stored bytes are (encrypted, if it was stored so); it may not exist, or may be
        corrupt: see :meth:`check`."""
        ...

    def fetch(self, digest: str, *, verify: bool = True) -> Path:
        """A local file with the artifact's content, for a runtime to load; with ``verify``, that content's sha256 is
        checked first. Raises :class:`ArtifactMissing`, :class:`DigestMismatch`, ``ArtifactIntegrityError`` (encrypted
        bytes that fail authentication) or ``ArtifactKeyError`` (encrypted with a key this store does not have)."""
        ...

    def check(self, digest: str) -> str | None:
        """The actual digest of the artifact's content, or None when it is missing or cannot be read back
        (encrypted bytes that fail authentication, or encrypted with another key)."""
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


def open_url(url: str, *, home: Path, key: ArtifactKey | None) -> LocalArtifactStore:
    """The folder ``url`` names (a path, or ``file:///path``); decrypted copies go to ``home/cache/decrypted``."""
    path = url.removeprefix("file://")
    return LocalArtifactStore(Path(path).expanduser(), key=key, decrypted=home / "cache" / "decrypted")


class LocalArtifactStore:
    """Artifacts as files under ``root/sha256/<2 hex>/<64 hex>``, encrypted with ``key`` when one is given.

    ``decrypted`` (default: ``root/../cache/decrypted``) holds the plaintext copies of encrypted artifacts, under
    the same layout, and, with a key, the scratch folders."""

    def __init__(self, root: Path, *, key: ArtifactKey | None = None, decrypted: Path | None = None) -> None:
        self.root = root
        self.key = key
        self.decrypted = decrypted if decrypted is not None else root.parent / "cache" / "decrypted"
        self._tmp = root / "tmp"
        self._private_tmp = self.decrypted / "tmp"
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
        if not self._tmp.is_dir() and not self._private_tmp.is_dir():
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
        # What is prepared here is plaintext: with a key, it goes to the private folder, never under the store.
        where = self._private() if self.key is not None else self._tmp
        where.mkdir(parents=True, exist_ok=True)
        with inuse.held_folder(where, "scratch-", self.guard(exclusive=False)) as path:
            yield path

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
        """Uploads and scratch folders in ``tmp/``, and scratch folders and decryptions in the private ``tmp/``."""
        found = [p for where in (self._tmp, self._private_tmp) if where.is_dir() for p in where.iterdir()]
        return [
            Temporary(p, "upload" if p.name.startswith("upload-") else "scratch", inuse.is_held(p))
            for p in sorted(found)
        ]

    def remove_temporary(self, path: Path) -> bool:
        if path.parent not in (self._tmp, self._private_tmp):
            raise InvalidInput(f"{path} is not in the artifact store's temporary folder {self._tmp}")
        return inuse.remove_unless_held(path)

    def _path(self, digest: str, base: Path | None = None) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise InvalidInput(f"malformed artifact digest {digest!r}")
        return (base or self.root) / "sha256" / hexdigest[:2] / hexdigest

    def _private(self) -> Path:
        """The private ``tmp/`` of plaintext, created 0700 (as is the folder it is in)."""
        self.decrypted.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.decrypted, 0o700)  # whatever made it before
        self._private_tmp.mkdir(mode=0o700, exist_ok=True)
        return self._private_tmp

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
        with source.open("rb") as src:
            digest, size = copy_hashed(src, out) if self.key is None else encryption.encrypt(src, out, self.key)
        out.flush()
        os.fsync(out.fileno())
        final = self._path(digest)
        # Kept when intact and stored as this store stores (so registering again with a key encrypts an old one).
        if final.exists() and _encrypted(final) == (self.key is not None) and self.check(digest) == digest:
            tmp.unlink()
            return digest, size
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return digest, size

    def local_path(self, digest: str) -> Path:
        return self._path(digest)

    def fetch(self, digest: str, *, verify: bool = True) -> Path:
        path = self._path(digest)
        if not path.is_file():
            if verify:
                raise ArtifactMissing(f"{digest} is missing from the artifact store")
            return path
        if not _encrypted(path):
            if verify and (actual := sha256_file(path)) != digest:
                raise DigestMismatch(actual)
            return path
        copy = self._path(digest, self.decrypted)
        if not verify and copy.is_file():
            return copy
        return self._decrypt(path, digest, copy)

    def _decrypt(self, path: Path, digest: str, copy: Path) -> Path:
        """Decrypt ``path`` into ``copy`` (replaced only once the plaintext's digest is ``digest``)."""
        where = self._private()
        with self.guard(exclusive=False):  # created and locked before a collector can see it
            fd, name = tempfile.mkstemp(dir=where, prefix="decrypt-")  # 0600
            fcntl.flock(fd, fcntl.LOCK_EX)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as out:
            try:
                with path.open("rb") as src:
                    actual, _ = encryption.decrypt(src, self.key, out)
                if actual != digest:
                    raise DigestMismatch(actual)
                out.flush()  # not fsynced: a copy, made again from the store when lost
                os.chmod(tmp, 0o400)
                for folder in reversed(copy.relative_to(self.decrypted).parents[:-1]):
                    (self.decrypted / folder).mkdir(mode=0o700, exist_ok=True)
                os.replace(tmp, copy)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return copy

    def check(self, digest: str) -> str | None:
        path = self._path(digest)
        if not path.is_file():
            return None
        if not _encrypted(path):
            return sha256_file(path)
        try:
            with path.open("rb") as src:
                return encryption.decrypt(src, self.key)[0]
        except (ArtifactIntegrityError, ArtifactKeyError):
            return None

    def delete(self, digest: str) -> None:
        self._path(digest).unlink(missing_ok=True)
        self._path(digest, self.decrypted).unlink(missing_ok=True)


def copy_hashed(src: BinaryIO, out: BinaryIO) -> tuple[str, int]:
    """Copy ``src`` to ``out``; the ``sha256:<hex>`` digest and size of what was copied."""
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        out.write(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _encrypted(path: Path) -> bool:
    try:
        return encryption.is_encrypted(path)
    except FileNotFoundError:
        return False


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
