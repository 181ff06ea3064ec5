"""maas: a self-hosted Model-as-a-Service platform.

``maas.Registry`` is imported lazily so that ``import maas`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from maas.registry import Registry

__all__ = ["Registry", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Registry":
        from maas.registry import Registry

        return Registry
    raise AttributeError(f"module 'maas' has no attribute {name!r}")
