"""Nothing left behind: registrations killed (SIGKILL) at random moments leave no visible partial
version, `maas models verify` reports what they left, and `maas gc` removes all of it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from maas.registry import Registry
from maas.testing.models import make_multi_io_model

pytestmark = pytest.mark.slow

ATTEMPTS = 50
#: Uninterrupted registrations first: one creates the database, then two of each kind are timed.
WARMUP = 5
#: A registration as a separate process that imports no torch (about a second).
REGISTER = (
    "import sys\n"
    "from maas.registry import Registry\n"
    "Registry().register(sys.argv[1], 'victim', tags={'attempt': sys.argv[2]})\n"
)
#: What MAAS_HOME may hold besides the referenced artifacts (empty folders aside).
BOOKKEEPING = {"maas.db", "maas.db-wal", "maas.db-shm", "maas.migrate.lock", "artifacts/.lock"}


def hf_directory(dest: Path, seed: int) -> Path | None:
    """A small Hugging Face directory (MiniLM's config and tokenizer, 16 MiB of safetensors weights
    of its own: registering only reads the config and tokenizer), or None where MiniLM is absent."""
    try:
        from tests.unit.test_hf_transformers import small_copy
    except ImportError:
        return None
    from safetensors.numpy import save_file

    small_copy(dest, weights=False)
    weights = np.random.default_rng(seed).standard_normal((1024, 4096)).astype(np.float32)
    save_file({"embeddings.weight": weights}, str(dest / "model.safetensors"))
    return dest


def packed_digest(directory: Path, scratch: Path) -> str:
    from maas.runtimes.hf import pack

    return file_digest(pack(directory, scratch / f"{directory.name}.zip"))


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def start(source: Path, attempt: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", REGISTER, str(source), str(attempt)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def check_versions(expected: dict[str, int]) -> int:
    """Every visible version is whole: its artifact verifies and is the one its attempt registered,
    its metadata is all there, and the version numbers have no gaps. Returns how many there are."""
    reg = Registry()
    versions = reg.list_versions("victim") if reg.list_models() else []
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    for mv in versions:
        assert reg.artifact_path(mv).is_file()  # raises on a missing or changed artifact
        assert expected[mv.artifact_digest] == int(mv.tags["attempt"]), mv
        assert mv.signature.inputs and mv.format in ("onnx", "hf_transformers")
    return len(versions)


def leftovers(home: Path) -> list[str]:
    """Files under MAAS_HOME that are neither bookkeeping nor an artifact some version references."""
    referenced = {d.partition(":")[2] for d in Registry().version_digests().values()}
    out = []
    for path in sorted(home.rglob("*")):
        rel = path.relative_to(home).as_posix()
        if path.is_dir() and not path.is_symlink():
            if rel.startswith(("artifacts/tmp/", "cache/hf/")):
                out.append(rel + "/")  # an empty leftover folder is debris too
            continue
        if rel in BOOKKEEPING or (rel.startswith("artifacts/sha256/") and path.name in referenced):
            continue
        out.append(rel)
    return out


def maas_json(env: dict[str, str], *args: str) -> object:
    proc = subprocess.run([sys.executable, "-m", "maas", *args, "--json"], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.timeout(900)
def test_registrations_killed_at_random_moments_leave_nothing_behind(
    home: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    seed = int(os.environ.get("MAAS_TEST_SEED", random.randrange(2**32)))
    print(f"seed {seed} (rerun with MAAS_TEST_SEED={seed})")
    rng = random.Random(seed)
    private_tmp = tmp_path / "tmpdir"  # the registrations' system temp dir, to see what they leave there
    private_tmp.mkdir()
    env = {**cli_env, "TMPDIR": str(private_tmp)}
    system_packs = set(Path(tempfile.gettempdir()).glob("maas-pack-*"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    # One distinct source per attempt, so an artifact stored by a killed attempt is referenced by no one.
    sources: list[Path] = []
    expected: dict[str, int] = {}  # digest -> attempt
    for i in range(WARMUP + ATTEMPTS):
        as_directory = i in (1, 3) if i < WARMUP else i % 3 == 0  # a third of the attempts
        directory = hf_directory(tmp_path / f"hf{i}", seed=i) if as_directory else None
        if directory is not None:
            sources.append(directory)
            expected[packed_digest(directory, scratch)] = i
        else:
            sources.append(make_multi_io_model(tmp_path / f"m{i}.onnx", scale=float(i)))
            expected[file_digest(sources[-1])] = i

    # How long an uninterrupted registration of each kind lives once the database exists (the first run
    # creates it): the shortest of two, as other work on the machine only ever slows one down.
    lifetime: dict[bool, float] = {}
    for i in range(WARMUP):
        began = time.monotonic()
        proc = start(sources[i], i, env)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        if i:
            kind = sources[i].is_dir()
            lifetime[kind] = min(lifetime.get(kind, float("inf")), time.monotonic() - began)
    lifetime.setdefault(True, lifetime[False])
    print(f"an uninterrupted registration takes {lifetime[False]:.2f} s (file), {lifetime[True]:.2f} s (directory)")
    assert check_versions(expected) == WARMUP

    outcomes: Counter[str] = Counter()
    for i in range(WARMUP, WARMUP + ATTEMPTS):
        delay = rng.uniform(0, 1.2 * lifetime[sources[i].is_dir()])
        proc = start(sources[i], i, env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            outcomes["finished before the kill"] += 1
        else:
            assert proc.returncode == -signal.SIGKILL, err.decode()
            outcomes["killed"] += 1
        check_versions(expected)
    report = maas_json(cli_env, "models", "verify")
    assert isinstance(report, dict) and report["ok"], report
    debris = Counter(d["kind"] for d in report["debris"])
    print(f"{dict(outcomes)}; debris before gc: {dict(debris) or 'none'}")
    assert outcomes["killed"] >= ATTEMPTS // 5, outcomes  # the delays really do cut registrations short

    removed = maas_json(cli_env, "gc")
    assert isinstance(removed, dict) and removed["in_use"] == 0
    assert sorted(d["path"] for d in removed["removed"]) == sorted(d["path"] for d in report["debris"])
    assert leftovers(home) == []
    after = maas_json(cli_env, "models", "verify")
    assert isinstance(after, dict) and after["ok"] and after["debris"] == []
    assert len(after["versions"]) == check_versions(expected)
    assert {p.name for p in private_tmp.iterdir()} <= {".ses"}  # onnxruntime's id file, written once on import
    assert set(Path(tempfile.gettempdir()).glob("maas-pack-*")) <= system_packs
