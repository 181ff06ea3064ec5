"""The house's walls, checked: small modules, no import cycles (none hidden inside functions either), imports
only down the layers of ARCHITECTURE.md, and a CLI that starts without the heavy frameworks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "maas"
MAX_LINES = 400

#: Layer of each top-level part of maas (ARCHITECTURE.md); a module imports only from its own layer or lower ones.
LAYERS = {
    "envs": 1,
    "errors": 1,
    "tensors": 1,
    "imports": 1,
    "configfile": 1,
    "runtimes": 2,
    "registry": 3,
    "access": 3,
    "training": 4,
    "serving": 5,
    "compression": 5,
    "testing": 5,
    "cli": 6,
    "demo": 6,
    "__init__": 7,
    "__main__": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = ["maas", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every maas module ``name`` imports, at module level or inside functions (TYPE_CHECKING ones too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_module_is_over_the_limit() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert not {n: c for n, c in long.items() if c > MAX_LINES}


def test_no_import_cycles() -> None:
    # A package's __init__ that re-exports its own modules is not a cycle of ideas: collapse each module onto
    # itself, and ignore edges from a package to its own children.
    def edges(name: str) -> set[str]:
        return {t for t in GRAPH[name] if not t.startswith(name + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges(n)):
            if state.get(m) == 1:
                cycles.append([*stack[stack.index(m) :], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
    assert not cycles, cycles[:5]


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_only_go_down() -> None:
    upward = []
    for name, targets in GRAPH.items():
        here = _part(name)
        for t in targets:
            there = _part(t)
            if LAYERS[there] > LAYERS[here] and t != "maas":
                upward.append(f"{name} -> {t}")
    # Serving never imports training or compression, nor compression serving (ARCHITECTURE.md).
    apart = {("serving", "training"), ("serving", "compression"), ("compression", "serving")}
    upward += [f"{n} -> {t}" for n, ts in GRAPH.items() for t in ts if (_part(n), _part(t)) in apart]
    assert not upward, upward


@pytest.mark.parametrize("argv", [["--help"], ["models", "list"]])
def test_cli_starts_without_heavy_frameworks(argv: list[str], cli_env: dict[str, str]) -> None:
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['maas', *{argv!r}]\n"
        "try:\n    runpy.run_module('maas', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
