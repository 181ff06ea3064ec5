"""The load generators the serving benchmark drives the server with, installed on first use.

``wrk`` comes from Debian (``apt-get``, so root). Triton's ``perf_analyzer`` ships as a binary inside the
``tritonclient`` manylinux wheel; that wheel goes to ``bench/.tools/`` (never into the venv, whose own
tritonclient is a different version), with ``libcudart.so.12`` from NVIDIA's runtime wheel beside it, which the
binary links against even when no GPU is used, and Debian's ``libb64``. Each function is idempotent: a tool
already there is only checked. A tool that cannot be had raises :class:`ToolMissing` with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent / ".tools"
TRITONCLIENT = "2.49.0"
CUDA_RUNTIME = "12.9.79"
#: Shared libraries perf_analyzer links against -> the Debian package that has them.
DEBIAN_LIBS = {"libb64.so.0d": "libb64-0d"}

Say = Callable[[str], None]


class ToolMissing(RuntimeError):
    """A tool is not installed and could not be; the message says why and what to do."""


@dataclass(frozen=True)
class Tool:
    name: str
    path: Path
    version: str
    env: dict[str, str] = field(default_factory=dict)  # what to add to the environment it runs in

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def _run(
    cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 5) -> str:
    return " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-lines:])


def _apt_install(packages: list[str], say: Say) -> None:
    if shutil.which("apt-get") is None:
        raise ToolMissing(f"no apt-get on this machine to install {' '.join(packages)}; install them by hand")
    if os.geteuid() != 0:
        raise ToolMissing(
            f"installing {' '.join(packages)} needs root: run `sudo apt-get install -y {' '.join(packages)}`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say(f"apt-get install -y {' '.join(packages)}")
    proc = _run(["apt-get", "install", "-y", *packages], env=env)
    if proc.returncode != 0:  # a fresh image often has no package lists yet
        say("apt-get update")
        _run(["apt-get", "update"], env=env)
        proc = _run(["apt-get", "install", "-y", *packages], env=env)
    if proc.returncode != 0:
        raise ToolMissing(f"apt-get install {' '.join(packages)} failed: {_tail(proc)}")


def _pip_target(requirement: str, target: Path, say: Say) -> None:
    """``pip install --no-deps --target``, into a scratch folder renamed into place: a failed or interrupted
    install leaves nothing that looks installed."""
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    say(f"pip install --no-deps --target {target} {requirement}")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(scratch), requirement]
    proc = _run(cmd)
    if proc.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise ToolMissing(f"pip could not install {requirement}: {_tail(proc)}")
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)


def wrk(say: Say = print) -> Tool:
    """``wrk`` on PATH, installed with apt-get if missing."""
    if shutil.which("wrk") is None:
        _apt_install(["wrk"], say)
    path = shutil.which("wrk")
    if path is None:
        raise ToolMissing("apt-get installed wrk but it is not on PATH")
    proc = _run([path, "-v"])  # prints the version and the usage, and exits 1
    match = re.search(r"wrk (\S+)", proc.stdout + proc.stderr)
    if match is None:
        raise ToolMissing(f"{path} -v did not print a version: {_tail(proc)}")
    return Tool("wrk", Path(path), match.group(1))


def _missing_libs(binary: Path, env: dict[str, str]) -> list[str]:
    proc = _run(["ldd", str(binary)], env=env)
    return re.findall(r"^\s*(\S+) => not found", proc.stdout, flags=re.MULTILINE)


def perf_analyzer(say: Say = print) -> Tool:
    """Triton's ``perf_analyzer`` from the tritonclient wheel, with the libraries it needs, under ``bench/.tools``."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise ToolMissing(f"the tritonclient wheel's perf_analyzer is built for Linux x86_64, not {sys.platform}")
    client_dir = TOOLS / f"tritonclient-{TRITONCLIENT}"
    binary = client_dir / "bin" / "perf_analyzer"
    if not binary.exists():
        _pip_target(f"tritonclient=={TRITONCLIENT}", client_dir, say)
        if not binary.exists():
            raise ToolMissing(
                f"the tritonclient {TRITONCLIENT} wheel has no bin/perf_analyzer (looked in {client_dir})"
            )
    cuda_dir = TOOLS / "cuda"
    lib_dir = cuda_dir / "nvidia" / "cuda_runtime" / "lib"
    if not (lib_dir / "libcudart.so.12").exists():
        _pip_target(f"nvidia-cuda-runtime-cu12=={CUDA_RUNTIME}", cuda_dir, say)
    library_path = ":".join(p for p in (str(lib_dir), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    extra = {"LD_LIBRARY_PATH": library_path}
    env = {**os.environ, **extra}
    missing = _missing_libs(binary, env)
    packages = sorted({DEBIAN_LIBS[lib] for lib in missing if lib in DEBIAN_LIBS})
    if packages:
        _apt_install(packages, say)
        missing = _missing_libs(binary, env)
    if missing:
        raise ToolMissing(f"perf_analyzer needs {', '.join(missing)}, which neither Debian nor pip provided here")
    # --help is not an option it knows: it prints the usage and exits 99; the usage is what proves it runs.
    proc = _run([str(binary), "--help"], env=env, timeout=30)
    if "--concurrency-range" not in proc.stdout + proc.stderr:
        raise ToolMissing(f"{binary} --help did not print its usage: {_tail(proc)}")
    return Tool("perf_analyzer", binary, f"tritonclient {TRITONCLIENT}", extra)
