"""Run maas's benchmarks (``make bench``); ``--only NAME`` runs one. Results go to ``bench/results/``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from rich.console import Console

#: Benchmark name -> "module:function" in this folder; the function takes a Rich console.
BENCHMARKS = {
    "serving": "serving:run",
    "training": "training:run",
    "compression": "compression:run",
    "llm": "llm:run",
    "artifact_encryption": "artifact_encryption:run",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    console = Console()
    for name in args.only or list(BENCHMARKS):
        module, _, attr = BENCHMARKS[name].partition(":")
        console.rule(f"[bold]{name}")
        began = time.perf_counter()
        getattr(importlib.import_module(module), attr)(console)
        console.print(f"[dim]{name} took {time.perf_counter() - began:.1f} s[/]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
