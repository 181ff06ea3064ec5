"""Debris: `Registry.verify` reports it, `Registry.gc` removes it, and never what a version or a
registration in flight uses."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from maas.registry import Debris, GcResult, Registry, debris, inuse
from maas.testing.models import make_linear_model, make_multi_io_model

pytestmark = pytest.mark.each_database  # every test that opens a database: on SQLite and on PostgreSQL


def kinds(found: Iterable[Debris]) -> dict[str, str]:
    return {d.path: d.kind for d in found}


@pytest.fixture
def lin(tmp_path: Path) -> Path:
    return make_linear_model(tmp_path / "lin.onnx")


def plant_debris(registry: Registry) -> dict[str, str]:
    """One of each kind of debris a crash leaves; returns path (relative to MAAS_HOME) -> kind."""
    store = registry.home / "artifacts"
    orphan = registry.artifacts.put(make_multi_io_model(registry.home.parent / "orphan.onnx"))[0]
    hexdigest = orphan.partition(":")[2]
    (store / "tmp" / "upload-dead").write_bytes(b"x" * 10)
    (store / "tmp" / "scratch-dead").mkdir()
    (store / "tmp" / "scratch-dead" / "model.zip").write_bytes(b"y" * 20)
    cache = registry.home / "cache" / "hf"
    old = cache / ".extract-dead"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "w.safetensors").write_bytes(b"z" * 30)
    long_ago = time.time() - 2 * debris.EXTRACTION_GRACE_S
    for p in (old / "sub" / "w.safetensors", old / "sub", old):
        os.utime(p, (long_ago, long_ago))
    (cache / f"{'c' * 64}-123").mkdir()
    (cache / f"{'c' * 64}-123" / "maas-hf.json").write_text("{}")
    converted = registry.home / "cache" / "causal_lm"  # GGUF conversions
    (converted / ("d" * 64)).mkdir(parents=True)
    (converted / ("d" * 64) / "model.safetensors").write_bytes(b"w" * 40)
    (converted / f".{'d' * 64}.lock").write_bytes(b"")
    (converted / ".discard-x").mkdir()
    dead = converted / ".convert-dead"
    dead.mkdir()
    os.utime(dead, (long_ago, long_ago))
    return {
        f"cache/causal_lm/{'d' * 64}": "cache",
        f"cache/causal_lm/.{'d' * 64}.lock": "cache",
        "cache/causal_lm/.discard-x": "cache",
        "cache/causal_lm/.convert-dead": "extraction",
        f"artifacts/sha256/{hexdigest[:2]}/{hexdigest}": "artifact",
        "artifacts/tmp/upload-dead": "upload",
        "artifacts/tmp/scratch-dead": "scratch",
        "cache/hf/.extract-dead": "extraction",
        f"cache/hf/{'c' * 64}-123": "cache",
    }


def test_verify_reports_debris_and_gc_removes_only_it(registry: Registry, lin: Path) -> None:
    mv = registry.register(lin, "m")
    used_cache = registry.home / "cache" / "hf" / f"{mv.artifact_digest.partition(':')[2]}-{mv.artifact_size}"
    used_cache.mkdir(parents=True)
    young = registry.home / "cache" / "hf" / ".extract-young"  # may be a load in progress
    young.mkdir()
    used_conversion = registry.home / "cache" / "causal_lm" / mv.artifact_digest.partition(":")[2]
    used_conversion.mkdir(parents=True)
    converting = registry.home / "cache" / "causal_lm" / ".convert-young"
    converting.mkdir()
    planted = plant_debris(registry)

    report = registry.verify()
    assert report.ok and [(r.name, r.version) for r in report] == [("m", 1)]
    assert kinds(report.debris) == planted
    assert report.debris_bytes == sum(d.size for d in report.debris) > 60
    assert all(d.age_s >= 0 for d in report.debris)
    assert kinds(registry.verify("m").debris) == planted  # store-wide, whichever model is named

    dry = registry.gc(dry_run=True)
    assert dry.dry_run and kinds(dry.removed) == planted
    assert kinds(registry.verify().debris) == planted

    result = registry.gc()
    assert kinds(result.removed) == planted and result.bytes_freed == report.debris_bytes
    assert result.in_use == 2  # the young extraction and conversion
    assert registry.verify().debris == ()
    for path in planted:
        assert not (registry.home / path).exists(), path
    assert young.is_dir() and used_cache.is_dir() and used_conversion.is_dir() and converting.is_dir()
    assert registry.artifact_path(registry.get_version("m", 1)).is_file()
    assert registry.gc().removed == ()


def test_gc_leaves_temporaries_a_live_process_holds(registry: Registry) -> None:
    tmp = registry.home / "artifacts" / "tmp"
    tmp.mkdir(parents=True)
    held = tmp / "upload-live"
    held.write_bytes(b"partial")
    fd = inuse.hold(held)  # as put() holds its upload; another open file description than gc's
    try:
        with registry.artifacts.scratch() as scratch:
            (scratch / "model.zip").write_bytes(b"packing")
            assert registry.verify().debris == ()
            result = registry.gc()
            assert result.removed == () and result.in_use == 2
            assert held.is_file() and (scratch / "model.zip").is_file()
        assert not scratch.exists()  # the scratch folder goes with its context
    finally:
        os.close(fd)
    # Released, as kill -9 releases it: collectable at once.
    assert kinds(registry.gc().removed) == {"artifacts/tmp/upload-live": "upload"}


def test_gc_waits_for_a_registration_between_storing_and_committing(
    registry: Registry, lin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored, release = threading.Event(), threading.Event()
    real_create = registry.store.create_version

    def slow_commit(*args: object, **kwargs: object) -> object:
        stored.set()  # the artifact is in the store, referenced by no row yet
        assert release.wait(30)
        return real_create(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(registry.store, "create_version", slow_commit)
    registering = threading.Thread(target=registry.register, args=(lin, "m"))
    registering.start()
    assert stored.wait(30)
    collected: list[GcResult] = []
    collecting = threading.Thread(target=lambda: collected.append(Registry().gc()))
    collecting.start()
    collecting.join(0.5)
    assert collecting.is_alive(), "gc must wait while a registration holds the store's shared guard"
    release.set()
    registering.join(30)
    collecting.join(30)
    assert collected and collected[0].removed == ()
    assert registry.verify().ok and registry.get_version("m", 1)


def test_gc_leaves_the_scratch_of_a_registration_still_packing(
    registry: Registry, lin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from maas import runtimes

    packing, release = threading.Event(), threading.Event()
    seen: list[Path] = []

    def slow_pack(path: Path, fmt: str, dest_dir: Path) -> Path:
        (dest_dir / "half.zip").write_bytes(b"half a zip")
        seen.append(dest_dir)
        packing.set()
        assert release.wait(30)
        return path

    monkeypatch.setattr(runtimes, "pack", slow_pack)
    registering = threading.Thread(target=registry.register, args=(lin, "m"))
    registering.start()
    assert packing.wait(30)
    result = registry.gc()
    assert result.removed == () and result.in_use == 1 and (seen[0] / "half.zip").is_file()
    release.set()
    registering.join(30)
    assert registry.get_version("m", 1) and not seen[0].exists()
    assert registry.verify().debris == ()


def test_store_clears_only_old_unheld_temporaries_when_opened(registry: Registry) -> None:
    tmp = registry.home / "artifacts" / "tmp"
    tmp.mkdir(parents=True)
    old, held, young = tmp / "upload-old", tmp / "upload-held", tmp / "upload-young"
    for p in (old, held, young):
        p.write_bytes(b"x")
    long_ago = time.time() - 7200
    os.utime(old, (long_ago, long_ago))
    os.utime(held, (long_ago, long_ago))
    fd = inuse.hold(held)
    try:
        Registry()
        assert not old.exists() and held.exists() and young.exists()
    finally:
        os.close(fd)
