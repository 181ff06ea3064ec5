"""Artifacts encrypted at rest: the format round-trips, any change to the stored bytes is refused, a wrong or missing
key is named, no plaintext is written under the store, and a store with a key still reads its plaintext artifacts."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from maas import runtimes
from maas.errors import ArtifactIntegrityError
from maas.registry import Registry
from maas.registry.artifacts import DigestMismatch, LocalArtifactStore
from maas.registry.encryption import CHUNK, HEADER_SIZE, TAG, ArtifactKey, ArtifactKeyError, decrypt, encrypt, load_key
from maas.testing.models import make_linear_model

#: Appears many times in the test artifacts' plaintext; must appear in no stored file.
PATTERN = b"PLAINTEXT-MARKER-0123456789"


def key(seed: int = 0) -> ArtifactKey:
    return ArtifactKey(hashlib.sha256(bytes([seed])).digest(), f"key-{seed}")


def payload(size: int, seed: int = 0) -> bytes:
    data = bytearray(np.random.default_rng(seed).bytes(size))
    for at in range(0, size - len(PATTERN), 100_000):
        data[at : at + len(PATTERN)] = PATTERN
    return bytes(data)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def edit(path: Path, change: Callable[[bytes], bytes]) -> None:
    path.chmod(0o644)
    path.write_bytes(change(path.read_bytes()))


def store(tmp_path: Path, k: ArtifactKey | None) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "home" / "artifacts", key=k, decrypted=tmp_path / "home" / "cache" / "dec")


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 12345])
def test_round_trip_at_chunk_boundaries(size: int) -> None:
    data = payload(size)
    sealed = io.BytesIO()
    digest, n = encrypt(io.BytesIO(data), sealed, key())
    assert (digest, n) == ("sha256:" + hashlib.sha256(data).hexdigest(), size)
    chunks = max(1, -(-size // CHUNK))
    assert len(sealed.getvalue()) == HEADER_SIZE + size + chunks * TAG
    out = io.BytesIO()
    assert decrypt(io.BytesIO(sealed.getvalue()), key(), out) == (digest, size)
    assert out.getvalue() == data


def test_every_change_to_the_stored_bytes_is_refused() -> None:
    sealed = io.BytesIO()
    encrypt(io.BytesIO(payload(2 * CHUNK + 100)), sealed, key())
    good = sealed.getvalue()
    step = CHUNK + TAG
    chunk = [good[HEADER_SIZE + i * step : HEADER_SIZE + (i + 1) * step] for i in range(3)]
    flipped = bytearray(good)
    flipped[HEADER_SIZE + step + 7] ^= 1
    header_changed = bytearray(good)
    header_changed[HEADER_SIZE - 1] ^= 1  # the file nonce
    bad = {
        "one ciphertext byte": bytes(flipped),
        "one tag byte": good[:-1] + bytes([good[-1] ^ 1]),
        "the nonce in the header": bytes(header_changed),
        "cut at a chunk boundary": good[: HEADER_SIZE + 2 * step],
        "cut inside a chunk": good[:-50],
        "cut to the header": good[:HEADER_SIZE],
        "the last chunk dropped and the one before kept": good[:HEADER_SIZE] + chunk[0] + chunk[1],
        "bytes appended": good + b"\0" * 16,
        "two chunks swapped": good[:HEADER_SIZE] + chunk[1] + chunk[0] + chunk[2],
    }
    for what, data in bad.items():
        with pytest.raises(ArtifactIntegrityError):
            decrypt(io.BytesIO(data), key())
            pytest.fail(f"{what}: accepted")


def test_wrong_or_missing_key_is_named() -> None:
    sealed = io.BytesIO()
    encrypt(io.BytesIO(b"weights"), sealed, key(0))
    with pytest.raises(ArtifactKeyError, match="MAAS_ARTIFACT_KEY_FILE") as info:
        decrypt(io.BytesIO(sealed.getvalue()), key(1))
    assert key(0).key_id.hex() in str(info.value) and key(1).key_id.hex() in str(info.value)
    with pytest.raises(ArtifactKeyError, match="MAAS_ARTIFACT_KEY_FILE is not set"):
        decrypt(io.BytesIO(sealed.getvalue()), None)


def test_key_file_formats_and_errors(tmp_path: Path) -> None:
    secret = os.urandom(32)
    for text in [secret, secret.hex().encode() + b"\n", base64.b64encode(secret) + b"\n"]:
        assert load_key(write(tmp_path / "k", text)).secret == secret
    with pytest.raises(ArtifactKeyError, match=r"MAAS_ARTIFACT_KEY_FILE=.*no such file.*openssl rand -hex 32"):
        load_key(tmp_path / "absent")
    for wrong in [b"", os.urandom(31), secret.hex()[:-2].encode(), base64.b64encode(os.urandom(16))]:
        with pytest.raises(ArtifactKeyError, match=r"MAAS_ARTIFACT_KEY_FILE=.*not a 256-bit key"):
            load_key(write(tmp_path / "k", wrong))


def test_store_keeps_no_plaintext_and_hands_out_a_private_verified_copy(tmp_path: Path) -> None:
    s = store(tmp_path, key())
    data = payload(3 * CHUNK)
    digest, size = s.put(write(tmp_path / "model.bin", data))
    assert (digest, size) == ("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    for f in (tmp_path / "home" / "artifacts").rglob("*"):
        assert not f.is_file() or PATTERN not in f.read_bytes(), f
    assert s.check(digest) == digest and s.digests() == [digest]
    copy = s.fetch(digest)
    assert copy.read_bytes() == data and copy.is_relative_to(s.decrypted)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o400 and stat.S_IMODE(s.decrypted.stat().st_mode) == 0o700
    assert not any(t.path.exists() for t in s.temporaries())  # no decryption left behind
    s.delete(digest)
    assert not copy.exists() and not s.local_path(digest).exists()


def test_tampered_store_is_refused_even_with_a_copy_decrypted_before(tmp_path: Path) -> None:
    s = store(tmp_path, key())
    digest, _ = s.put(write(tmp_path / "m", payload(CHUNK + 10)))
    copy = s.fetch(digest)
    edit(s.local_path(digest), lambda b: b[:-30] + bytes([b[-30] ^ 0x10]) + b[-29:])
    with pytest.raises(ArtifactIntegrityError, match="fails authentication"):
        s.fetch(digest)
    assert s.check(digest) is None
    assert copy.read_bytes() == payload(CHUNK + 10)  # the copy was not replaced by anything unverified
    edit(s.local_path(digest), lambda b: b[: HEADER_SIZE + CHUNK + TAG])
    with pytest.raises(ArtifactIntegrityError, match="fails authentication"):
        s.fetch(digest)


def test_copy_is_only_replaced_by_content_of_the_right_digest(tmp_path: Path) -> None:
    s = store(tmp_path, key())
    a, _ = s.put(write(tmp_path / "a", b"model a"))
    b, _ = s.put(write(tmp_path / "b", b"model b"))
    s.local_path(a).chmod(0o644)
    os.replace(s.local_path(b), s.local_path(a))  # a valid encrypted file under the wrong name
    with pytest.raises(DigestMismatch):
        s.fetch(a)
    assert not s._path(a, s.decrypted).exists()


def test_mixed_store_reads_old_plaintext_artifacts(tmp_path: Path) -> None:
    old, _ = store(tmp_path, None).put(write(tmp_path / "old", b"old weights"))
    s = store(tmp_path, key())
    new, _ = s.put(write(tmp_path / "new", b"new weights"))
    assert s.fetch(old) == s.local_path(old) and s.fetch(old).read_bytes() == b"old weights"
    assert s.fetch(new).read_bytes() == b"new weights" and s.check(old) == old and s.check(new) == new
    edit(s.local_path(old), lambda data: data.replace(b"old", b"odd"))
    with pytest.raises(DigestMismatch):
        s.fetch(old)
    # Storing the same content again with a key encrypts it.
    assert s.put(write(tmp_path / "again", b"old weights"))[0] == old
    assert s.local_path(old).read_bytes().startswith(b"MAAS") and s.fetch(old).read_bytes() == b"old weights"
    # Without the key, an encrypted artifact is named as such, never loaded as garbage.
    with pytest.raises(ArtifactKeyError, match="not set"):
        store(tmp_path, None).fetch(new)


def test_registry_with_a_key_file(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_ARTIFACT_KEY_FILE", str(write(tmp_path / "key", os.urandom(32).hex().encode())))
    reg = Registry()
    model = make_linear_model(tmp_path / "linear.onnx")
    mv = reg.register(model, "linear")
    assert mv.artifact_digest == "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    assert model.read_bytes() not in reg.artifacts.local_path(mv.artifact_digest).read_bytes()
    path = reg.artifact_path(mv)
    x = np.ones((2, 4), np.float32)
    got = runtimes.load(path, "onnx").infer({"x": x})["y"]
    expected = runtimes.load(model, "onnx").infer({"x": x})["y"]
    np.testing.assert_array_equal(got, expected)
    assert all(r.ok for r in reg.verify().versions)

    edit(reg.artifacts.local_path(mv.artifact_digest), lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:])
    with pytest.raises(ArtifactIntegrityError, match=r"models:/linear/1: artifact sha256:\w+ fails authentication"):
        reg.artifact_path(mv)
    [result] = reg.verify().versions
    assert not result.ok and "fails authentication" in result.message and result.actual is None

    monkeypatch.setenv("MAAS_ARTIFACT_KEY_FILE", str(write(tmp_path / "other", os.urandom(32))))
    other = Registry()
    mv2 = other.register(make_linear_model(tmp_path / "l2.onnx", seed=1), "l2")
    monkeypatch.setenv("MAAS_ARTIFACT_KEY_FILE", str(tmp_path / "key"))
    with pytest.raises(ArtifactKeyError, match=r"models:/l2/1: .*MAAS_ARTIFACT_KEY_FILE"):
        Registry().artifact_path(mv2)
    monkeypatch.setenv("MAAS_ARTIFACT_KEY_FILE", str(tmp_path / "absent"))
    with pytest.raises(ArtifactKeyError, match="no such file"):
        Registry()


def test_gc_removes_plaintext_copies_no_version_uses(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAAS_ARTIFACT_KEY_FILE", str(write(tmp_path / "key", os.urandom(32).hex().encode())))
    reg = Registry()
    mv = reg.register(make_linear_model(tmp_path / "linear.onnx"), "linear")
    kept = reg.artifact_path(mv)  # the plaintext copy a server loads
    assert kept.is_file() and "decrypted" in kept.parts
    # A copy whose stored artifact was removed by hand, outside maas: nothing references it.
    stray = kept.parent.parent / "ab" / ("ab" + "0" * 62)
    stray.parent.mkdir(mode=0o700)
    stray.write_bytes(b"plaintext of a removed model")
    assert [d.path for d in reg.gc(dry_run=True).removed if "decrypted" in str(d.path)] == [
        str(stray.relative_to(home))
    ]
    reg.gc()
    assert not stray.exists() and kept.is_file()
