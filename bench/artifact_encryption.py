"""What encrypting artifacts at rest costs: MB/s of storing (``put``) and of a verified load (``fetch``, what every
model load does) of one ~100 MB artifact, without a key and with one (AES-256-GCM, :mod:`maas.registry.encryption`).

Plain put: read, sha256, write, fsync. Encrypted put: the same plus AES-GCM. Plain load: sha256 of the stored file.
Encrypted load: AES-GCM decryption, sha256 of the plaintext, and writing the plaintext copy the runtime reads. The
files are in the page cache (a warm read, as when a model is loaded again); each figure is the median of
``REPEATS`` runs, the paths interleaved so that a neighbour's load falls on all of them. A put goes to a fresh store
each time (a second put of the same bytes into one store would find them already stored).

Run: ``python bench/run.py --only artifact_encryption`` (or ``python bench/artifact_encryption.py``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from maas.registry.artifacts import LocalArtifactStore
from maas.registry.encryption import ArtifactKey

import report

NAME = "artifact_encryption"
SIZE_MB = 100
REPEATS = 7
MB = 1_000_000


def run(console: Console) -> None:
    machine = report.machine_info(("cryptography",))
    key = ArtifactKey(hashlib.sha256(b"bench").digest(), "bench")
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="maas-bench-enc-") as folder:
        base = Path(folder)
        source = base / "model.bin"
        source.write_bytes(os.urandom(SIZE_MB * MB))
        size = source.stat().st_size
        for i in range(REPEATS):
            for mode, k in [("plaintext", None), ("encrypted", key)]:
                root = base / f"{mode}-{i}"
                store = LocalArtifactStore(root / "artifacts", key=k, decrypted=root / "decrypted")
                began = time.perf_counter()
                digest, _ = store.put(source)
                stored = time.perf_counter()
                store.fetch(digest, verify=True)
                loaded = time.perf_counter()
                seconds.setdefault(f"{mode} put", []).append(stored - began)
                seconds.setdefault(f"{mode} load", []).append(loaded - stored)
                shutil.rmtree(root)
    rows = []
    for path, runs in seconds.items():
        median = statistics.median(runs)
        rows.append({"path": path, "seconds": median, "mb_per_s": size / MB / median, "runs": runs})
    by = {r["path"]: r for r in rows}
    for what in ("put", "load"):
        by[f"encrypted {what}"]["relative"] = by[f"encrypted {what}"]["seconds"] / by[f"plaintext {what}"]["seconds"]
        by[f"plaintext {what}"]["relative"] = 1.0

    table = Table("path", "MB/s", "seconds", "time vs plaintext")
    cells = []
    for r in rows:
        cell = [r["path"], f"{r['mb_per_s']:,.0f}", f"{r['seconds']:.3f}", f"{r['relative']:.2f}x"]
        table.add_row(*cell)
        cells.append(cell)
    console.print(table)
    json_path = report.write_json(
        NAME,
        {"benchmark": NAME, "machine": machine, "config": {"size_mb": SIZE_MB, "repeats": REPEATS}, "results": rows},
    )
    body = (
        f"{machine['timestamp']}: one {SIZE_MB} MB artifact of random bytes, page cache warm, median of {REPEATS} "
        f"interleaved runs; cryptography {machine['cryptography']}. A put includes the fsync; an encrypted load "
        "decrypts, checks the sha256 and writes the plaintext copy the runtime loads, a plaintext load only checks "
        "the sha256.\n\n" + report.markdown_table(["path", "MB/s", "seconds", "time vs plaintext"], cells) + "\n"
    )
    md_path = report.write_markdown_section(NAME, "Artifact encryption benchmark", report.machine_key(machine), body)
    console.print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    run(Console())
