"""Artifacts in an S3-compatible bucket (``MAAS_ARTIFACTS_URL=s3://bucket/prefix``), content-addressed as locally.

An artifact is the object ``prefix/sha256/<2 hex>/<64 hex>``. :meth:`S3ArtifactStore.put` first copies the file into
a private upload folder (hashing it, or encrypting it with ``MAAS_ARTIFACT_KEY_FILE``), then uploads that copy with
one PUT, or a multipart upload above ``MAAS_S3_MULTIPART_THRESHOLD_MB``: S3 makes an object visible only once it is
complete, and the registry commits the version only after ``put`` returns, so a killed upload leaves no version and
no object. It leaves its upload folder, holding the multipart upload's id; ``maas gc`` aborts that upload (freeing
its parts) and removes the folder. Uploads other machines left are for a bucket lifecycle rule
(``AbortIncompleteMultipartUpload``).

Runtimes load from a local copy: ``MAAS_HOME/cache/s3/sha256/<2>/<hex>`` (plaintext, decrypted when the object is
encrypted; 0700 folder, read-only copies), written to a temporary file and renamed into place only once its sha256
is the digest, beside ``<hex>.etag``, the ETag of the object it came from. A verified load (:meth:`fetch`) asks the
bucket for the object's ETag (one HEAD), downloads it again when the object changed or the copy is missing, and
re-hashes the local copy: so a changed object is refused with the digest error even where a copy is cached, and a
changed copy is replaced. ``maas gc`` removes the copies of artifacts no version uses.

The guard (:meth:`S3ArtifactStore.guard`) is a lock file in the cache, exact between processes of one machine. Across
machines, ``maas gc`` leaves unreferenced objects younger than :data:`UNREFERENCED_GRACE_S` alone: they may belong to
a registration another machine is about to commit.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from maas.errors import ArtifactIntegrityError, InvalidInput
from maas.registry import encryption, inuse, s3_client
from maas.registry.artifacts import ArtifactMissing, DigestMismatch, Temporary, copy_hashed, sha256_file
from maas.registry.encryption import ArtifactKey, ArtifactKeyError
from maas.registry.s3_client import Location

#: An unreferenced object younger than this may be a registration in flight on another machine; gc spares it.
UNREFERENCED_GRACE_S = 3600.0
_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_UPLOAD_FILE = "upload.json"


def open_url(url: str, *, home: Path, key: ArtifactKey | None) -> S3ArtifactStore:
    """The store ``MAAS_ARTIFACTS_URL=s3://bucket/prefix`` names, caching copies under ``home/cache/s3``."""
    return S3ArtifactStore(Location.parse(url), cache=home / "cache" / "s3", key=key)


class S3ArtifactStore:
    """Artifacts as objects under ``location``; local verified copies under ``cache``; encrypted with ``key``."""

    def __init__(self, location: Location, *, cache: Path, key: ArtifactKey | None = None, client: Any = None) -> None:
        self.location = location
        self.cache = cache
        self.key = key
        self._tmp = cache / "tmp"
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client.make_client()
        return self._client

    def _s3(self) -> contextlib.AbstractContextManager[None]:
        return s3_client.translated(self.location, self.client.meta.endpoint_url)

    # --- local folders ----------------------------------------------------------------------------

    def _private(self) -> Path:
        """The cache's ``tmp/``, created 0700 (as is the cache: it holds plaintext of encrypted artifacts)."""
        self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.cache, 0o700)
        self._tmp.mkdir(mode=0o700, exist_ok=True)
        return self._tmp

    @contextlib.contextmanager
    def guard(self, *, exclusive: bool) -> Iterator[None]:
        self._private()
        with (self.cache / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _held_folder(self, prefix: str) -> contextlib.AbstractContextManager[Path]:
        """A new folder in ``tmp/``, locked as in use (created under the shared guard), removed on exit."""
        return inuse.held_folder(self._private(), prefix, self.guard(exclusive=False))

    def scratch(self) -> contextlib.AbstractContextManager[Path]:
        return self._held_folder("scratch-")

    def _copy(self, hexdigest: str) -> Path:
        return self.cache / "sha256" / hexdigest[:2] / hexdigest

    def local_path(self, digest: str) -> Path:
        """The local copy (which may not exist): the stored bytes are in the bucket."""
        return self._copy(_hex(digest))

    # --- storing --------------------------------------------------------------------------------

    def put(self, source: Path) -> tuple[str, int]:
        if not source.is_file():
            raise InvalidInput(f"{source} is not a file; register a model file such as model.onnx or model.pt2")
        with self._held_folder("upload-") as folder:
            body = folder / "object"
            with source.open("rb") as src, body.open("wb") as out:
                digest, size = copy_hashed(src, out) if self.key is None else encryption.encrypt(src, out, self.key)
            hexdigest = digest.removeprefix("sha256:")
            key = self.location.key(hexdigest)
            _record(folder, {"key": key})

            def remember(upload_id: str) -> None:
                _record(folder, {"key": key, "upload_id": upload_id})

            # Always uploaded, also when the object exists: a PUT replaces it whole, mending a corrupted one.
            with self._s3():
                s3_client.upload(self.client, self.location, key, body, {"sha256": hexdigest}, remember)
        return digest, size

    def delete(self, digest: str) -> None:
        hexdigest = _hex(digest)
        with self._s3():
            self.client.delete_object(Bucket=self.location.bucket, Key=self.location.key(hexdigest))
        copy = self._copy(hexdigest)
        copy.unlink(missing_ok=True)
        copy.with_suffix(".etag").unlink(missing_ok=True)

    # --- reading --------------------------------------------------------------------------------

    def fetch(self, digest: str, *, verify: bool = True) -> Path:
        hexdigest = _hex(digest)
        copy = self._copy(hexdigest)
        if copy.is_file():
            if not verify:
                return copy
            etag = self._etag(hexdigest)
            if etag is None:
                raise ArtifactMissing(f"{digest} is missing from the artifact store {self.location}")
            with contextlib.suppress(FileNotFoundError):
                if copy.with_suffix(".etag").read_text() == etag and sha256_file(copy) == digest:
                    return copy
        actual, path = self._download(hexdigest, keep=True)
        if actual != digest or path is None:
            raise DigestMismatch(actual)
        return path

    def check(self, digest: str) -> str | None:
        try:
            return self._download(_hex(digest), keep=False)[0]
        except (ArtifactMissing, ArtifactIntegrityError, ArtifactKeyError):
            return None

    def _etag(self, hexdigest: str) -> str | None:
        """The object's ETag, or None when there is no object."""
        from botocore.exceptions import ClientError

        with self._s3():
            try:
                head = self.client.head_object(Bucket=self.location.bucket, Key=self.location.key(hexdigest))
            except ClientError as exc:
                if s3_client.is_missing(exc):
                    return None
                raise
        return str(head["ETag"])

    def _download(self, hexdigest: str, *, keep: bool) -> tuple[str, Path | None]:
        """Download the object; the digest of its plaintext, and (with ``keep``, when it is the one asked for) the
        local copy it now is. Raises ``ArtifactMissing`` when there is no object."""
        from botocore.exceptions import ClientError

        with self._held_folder("download-") as folder:
            raw = folder / "object"
            with self._s3():
                try:
                    got = self.client.get_object(Bucket=self.location.bucket, Key=self.location.key(hexdigest))
                except ClientError as exc:
                    if s3_client.is_missing(exc):
                        raise ArtifactMissing(
                            f"sha256:{hexdigest} is missing from the artifact store {self.location}"
                        ) from None
                    raise
                with contextlib.closing(got["Body"]) as body, raw.open("wb") as out:
                    actual, _ = copy_hashed(body, out)
            plain = raw
            if encryption.is_encrypted(raw):
                plain = folder / "plain"
                with raw.open("rb") as src, plain.open("wb") as out:
                    actual, _ = encryption.decrypt(src, self.key, out)
            if not keep or actual != f"sha256:{hexdigest}":
                return actual, None
            copy = self._copy(hexdigest)
            os.chmod(plain, 0o400)
            for folder_ in (copy.parent.parent, copy.parent):
                folder_.mkdir(mode=0o700, exist_ok=True)
            _record(folder, str(got["ETag"]), name="etag")
            os.replace(folder / "etag", copy.with_suffix(".etag"))
            os.replace(plain, copy)
            return actual, copy

    # --- listing and collecting ------------------------------------------------------------------

    def digests(self) -> list[str]:
        """Every object's digest, but those written in the last :data:`UNREFERENCED_GRACE_S` (see the module)."""
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=UNREFERENCED_GRACE_S)
        base = self.location.base
        found = []
        with self._s3():
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=base)
            for page in pages:
                for obj in page.get("Contents", []):
                    shard, _, name = str(obj["Key"]).removeprefix(base).partition("/")
                    if _HEX64.fullmatch(name) and name[:2] == shard and obj["LastModified"] < cutoff:
                        found.append(f"sha256:{name}")
        return sorted(found)

    def temporaries(self) -> list[Temporary]:
        if not self._tmp.is_dir():
            return []
        return [
            Temporary(p, "upload" if p.name.startswith("upload-") else "scratch", inuse.is_held(p))
            for p in sorted(self._tmp.iterdir())
        ]

    def remove_temporary(self, path: Path) -> bool:
        """Remove a temporary folder unless a process holds it, first aborting the multipart upload it records."""
        if path.parent != self._tmp:
            raise InvalidInput(f"{path} is not in the artifact cache's temporary folder {self._tmp}")
        with inuse.claimed(path) as ours:
            if not ours:
                return False
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
                record = json.loads((path / _UPLOAD_FILE).read_text())
                with self._s3():
                    s3_client.abort(self.client, self.location, str(record["key"]), str(record["upload_id"]))
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return True


def _record(folder: Path, value: object, *, name: str = _UPLOAD_FILE) -> None:
    """Write ``folder/name`` whole or not at all (a JSON value, or a plain string)."""
    tmp = folder / f".{name}"
    tmp.write_text(value if isinstance(value, str) else json.dumps(value))
    os.replace(tmp, folder / name)


def _hex(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not _HEX64.fullmatch(hexdigest):
        raise InvalidInput(f"malformed artifact digest {digest!r}")
    return hexdigest
