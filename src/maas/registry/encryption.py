"""Artifacts encrypted at rest: AES-256-GCM over fixed-size chunks, with the key read from ``MAAS_ARTIFACT_KEY_FILE``.

A stored file is a header, then the chunks, each ``CHUNK`` bytes of plaintext (the last one shorter, possibly empty)
followed by its 16-byte tag::

    magic (8) · version (1) · chunk size (4, big-endian) · key id (8) · file nonce (12)

The key id is the first 8 bytes of the key's sha256: a file stored under another key is named as such, not reported
as corrupt. Each chunk's nonce is the random file nonce XOR its index, and its associated data is the whole header,
its index and whether it is the last chunk; so a chunk changed, moved, dropped, or the file cut short or extended,
fails authentication. The artifact's digest remains the sha256 of its plaintext, computed as it is written or read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from maas import envs
from maas.errors import ArtifactIntegrityError, Unavailable

log = logging.getLogger(__name__)

MAGIC = b"MAAS\x00ENC"
VERSION = 1
#: Plaintext bytes per chunk.
CHUNK = 1 << 20
#: The largest chunk size a header may name (a forged one must not make a reader allocate gigabytes).
MAX_CHUNK = 64 << 20
TAG = 16
_HEADER = struct.Struct("!8sBI8s12s")
HEADER_SIZE = _HEADER.size
KEY_BYTES = 32
_MAKE_KEY = "`openssl rand -hex 32 > FILE` (keep a copy: without it the encrypted artifacts cannot be read)"


class ArtifactKeyError(Unavailable):
    """The artifact key is missing, malformed, or not the one an artifact was stored with."""


@dataclass(frozen=True)
class ArtifactKey:
    """A 256-bit key and where it came from (for messages; never the key itself)."""

    secret: bytes = field(repr=False)
    source: str

    @property
    def key_id(self) -> bytes:
        return hashlib.sha256(self.secret).digest()[:8]


def key_from_env() -> ArtifactKey | None:
    """The key ``MAAS_ARTIFACT_KEY_FILE`` names, or None when it is unset (artifacts are stored in plaintext)."""
    name = envs.MAAS_ARTIFACT_KEY_FILE
    return None if not name else load_key(Path(name))


def load_key(path: Path) -> ArtifactKey:
    """Read a key file: 32 raw bytes, 64 hex characters or base64 of 32 bytes (surrounding whitespace ignored)."""
    where = f"MAAS_ARTIFACT_KEY_FILE={path}"
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ArtifactKeyError(
            f"{where}: no such file; create a key with {_MAKE_KEY.replace('FILE', str(path))}"
        ) from None
    except IsADirectoryError:
        raise ArtifactKeyError(f"{where} is a directory; it must name a file holding a 32-byte key") from None
    except OSError as exc:
        raise ArtifactKeyError(f"{where} cannot be read ({exc.strerror}); let this user read it") from None
    secret = _parse_key(raw)
    if secret is None:
        raise ArtifactKeyError(
            f"{where} holds {len(raw)} bytes that are not a 256-bit key; expected 32 raw bytes, 64 hex characters or "
            f"the base64 of 32 bytes; create one with {_MAKE_KEY.replace('FILE', str(path))}"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s can be read by other users (mode %o); `chmod 600 %s`", where, stat.S_IMODE(mode), path)
    return ArtifactKey(secret, str(path))


def _parse_key(raw: bytes) -> bytes | None:
    if len(raw) == KEY_BYTES:
        return raw
    text = raw.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if len(decoded) == KEY_BYTES else None


def is_encrypted(path: Path) -> bool:
    """Whether the file at ``path`` starts as an encrypted artifact does."""
    with path.open("rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def encrypt(src: BinaryIO, out: BinaryIO, key: ArtifactKey) -> tuple[str, int]:
    """Write ``src`` to ``out`` encrypted; the plaintext's ``sha256:<hex>`` digest and size."""
    header = _HEADER.pack(MAGIC, VERSION, CHUNK, key.key_id, os.urandom(12))
    aead, nonce = AESGCM(key.secret), header[-12:]
    h, size, index = hashlib.sha256(), 0, 0
    out.write(header)
    chunk = src.read(CHUNK)
    while True:
        following = src.read(CHUNK) if len(chunk) == CHUNK else b""
        last = not following
        h.update(chunk)
        size += len(chunk)
        out.write(aead.encrypt(_nonce(nonce, index), chunk, _associated(header, index, last)))
        if last:
            return "sha256:" + h.hexdigest(), size
        chunk, index = following, index + 1


def decrypt(src: BinaryIO, key: ArtifactKey | None, out: BinaryIO | None = None) -> tuple[str, int]:
    """Read an encrypted artifact from ``src``, writing its plaintext to ``out`` (if given); the plaintext's digest
    and size. Raises :class:`ArtifactKeyError` when ``key`` is None or not the one it was stored with, and
    ``ArtifactIntegrityError`` when its bytes were changed, cut short or extended."""
    header = src.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise ArtifactIntegrityError("is encrypted but shorter than its header: the file was cut short")
    magic, version, chunk_size, key_id, nonce = _HEADER.unpack(header)
    if magic != MAGIC or version != VERSION or not 0 < chunk_size <= MAX_CHUNK:
        raise ArtifactIntegrityError(
            f"has an encryption header this maas cannot read (version {version}, chunk size {chunk_size}); it was "
            "changed, or written by a newer maas"
        )
    if key is None:
        raise ArtifactKeyError(
            f"is stored encrypted (key id {key_id.hex()}) and MAAS_ARTIFACT_KEY_FILE is not set; set it to the key "
            "file the artifact was stored with"
        )
    if key_id != key.key_id:
        raise ArtifactKeyError(
            f"was stored encrypted with key id {key_id.hex()}, but MAAS_ARTIFACT_KEY_FILE ({key.source}) holds key id "
            f"{key.key_id.hex()}; point MAAS_ARTIFACT_KEY_FILE at the key the artifact was stored with"
        )
    aead, step = AESGCM(key.secret), chunk_size + TAG
    h, size, index = hashlib.sha256(), 0, 0
    sealed = src.read(step)
    while True:
        following = src.read(step) if len(sealed) == step else b""
        last = not following
        try:
            chunk = aead.decrypt(_nonce(nonce, index), sealed, _associated(header, index, last))
        except InvalidTag:
            raise ArtifactIntegrityError(
                f"fails authentication at chunk {index}: its encrypted bytes were changed, cut short or extended"
            ) from None
        h.update(chunk)
        size += len(chunk)
        if out is not None:
            out.write(chunk)
        if last:
            return "sha256:" + h.hexdigest(), size
        sealed, index = following, index + 1


def _nonce(file_nonce: bytes, index: int) -> bytes:
    return (int.from_bytes(file_nonce, "big") ^ index).to_bytes(12, "big")


def _associated(header: bytes, index: int, last: bool) -> bytes:
    return header + struct.pack("!QB", index, last)
