"""Import paths (``package.module:attribute``) that name users' own code in configs."""

from __future__ import annotations

import importlib
import re
from typing import Any

from maas.errors import InvalidInput

_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def check_import_path(path: str) -> str:
    if not isinstance(path, str) or not _PATH.fullmatch(path):
        raise ValueError(f"{path!r} is not an import path; write it as package.module:function")
    return path


def load_entry(spec: str) -> Any:
    """The object an extension table names as ``"module:attribute"`` (formats, steps, strategies, stores),
    imported on first use. For import paths users write in configs, use :func:`resolve`: it explains failures."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def resolve(path: str, what: str) -> Any:
    """Import ``package.module:attribute``; ``InvalidInput`` naming ``what`` and the fix otherwise."""
    check_import_path(path)
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(
            f"{what}: cannot import module {module_name!r} ({exc}); check the path, and that the module is on "
            "PYTHONPATH (or installed) where `maas train` runs"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InvalidInput(f"{what}: module {module_name!r} has no attribute {attr!r}; check {path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InvalidInput(f"{what}: {path!r} is not callable")
    return obj
