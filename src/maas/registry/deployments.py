"""Deployments: how servers serve each model name (dynamic batching, queueing, instances, threads).

Here are the rules a deployment's values follow whatever stores them (:func:`check_deployment`,
:func:`merge_deployment`), the file form ``maas deploy -f`` reads (:func:`read_deployments`), and the
:class:`~maas.registry.registry.Registry` methods that change and read deployments (:class:`DeploymentMethods`).
A deployment lives in the registry database beside the model's aliases; running servers poll
:meth:`DeploymentMethods.list_deployments` and follow its changes.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import ErrorDetails

from maas import configfile
from maas.errors import InvalidInput
from maas.registry.entities import Deployment
from maas.registry.store import MetadataStore
from maas.registry.uri import validate_name

#: The settings of a deployment (its fields but name, revision and updated_at), in the order they are shown.
SETTINGS = ("max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes", "max_queue_size", "instances", "threads")
#: The inclusive range of each numeric setting (``preferred_batch_sizes``: of each size, up to max_batch_size).
RANGES: dict[str, tuple[int, int]] = {
    "max_batch_size": (1, 4096),
    "max_queue_delay_ms": (0, 10_000),
    "preferred_batch_sizes": (1, 4096),
    "max_queue_size": (1, 1_000_000),
    "instances": (1, 64),
    "threads": (1, 256),
}


class _Bad(ValueError):
    """What is wrong with one setting's value, in words that follow its name."""


def _integer(value: Any, low: int, high: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise _Bad(f"must be an integer from {low} to {high}, got {value!r}") from None
    if not low <= number <= high:
        raise _Bad(f"must be from {low} to {high}, got {number}")
    return number


def _value(setting: str, value: Any) -> Any:
    """``value`` of ``setting`` checked and normalised (a float delay, a sorted tuple of sizes); ``_Bad`` if not."""
    low, high = RANGES[setting]
    if setting == "threads" and value is None:
        return None
    if setting == "max_queue_delay_ms":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Bad(f"must be a number of milliseconds from {low} to {high}, got {value!r}")
        delay = float(value)
        if not (math.isfinite(delay) and low <= delay <= high):
            raise _Bad(f"must be from {low} to {high} milliseconds, got {value!r}")
        return delay
    if setting == "preferred_batch_sizes":
        if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__"):
            raise _Bad(f"must be a list of integers from {low} to max_batch_size, e.g. [8, 16, 32]; got {value!r}")
        sizes = list(value)
        try:
            return tuple(sorted({_integer(size, low, high) for size in sizes}))
        except _Bad as exc:
            raise _Bad(f"{sizes!r}: each size {exc} (and at most max_batch_size)") from None
    return _integer(value, low, high)


def check_setting(setting: str, value: Any) -> Any:
    """``value`` of ``setting`` checked and normalised; ``InvalidInput`` naming the setting, the value and the
    allowed range if it does not fit."""
    try:
        return _value(setting, value)
    except _Bad as exc:
        raise InvalidInput(f"{setting} {exc}") from None


def check_deployment(deployment: Deployment) -> Deployment:
    """``deployment`` with every setting checked and normalised (``preferred_batch_sizes`` sorted, each once);
    ``InvalidInput`` naming the setting, the value and the allowed range at the first that does not fit."""
    values = {setting: check_setting(setting, getattr(deployment, setting)) for setting in SETTINGS}
    sizes, most = values["preferred_batch_sizes"], values["max_batch_size"]
    if sizes and sizes[-1] > most:
        raise InvalidInput(
            f"preferred_batch_sizes {list(sizes)} has {sizes[-1]}, above max_batch_size {most}; each must be from "
            f"1 to max_batch_size: raise max_batch_size or leave out the larger sizes"
        )
    return replace(deployment, **values)


def merge_deployment(base: Deployment, changes: Mapping[str, Any]) -> Deployment:
    """``base`` with ``changes`` (settings by name) applied and checked; unknown settings are ``InvalidInput``."""
    unknown = [key for key in changes if key not in SETTINGS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SETTINGS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidInput(
            f"{', '.join(map(repr, unknown))} is not a deployment setting{hint}; the settings: {', '.join(SETTINGS)}"
        )
    return check_deployment(replace(base, **changes))


def defaults() -> dict[str, Any]:
    """Every setting at its default: what a model never deployed runs with."""
    return {f.name: f.default for f in fields(Deployment) if f.name in SETTINGS}


def changed_settings(before: Deployment, after: Deployment) -> list[str]:
    """The settings whose values differ between two deployments of a model, in :data:`SETTINGS` order."""
    return [setting for setting in SETTINGS if getattr(before, setting) != getattr(after, setting)]


# --- the file form ------------------------------------------------------------------------------


class DeploymentSpec(BaseModel):
    """One deployment in a file: the model's name and the settings to change (those left out stay as they are)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    max_batch_size: int = 1
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_size: int = 256
    instances: int = 1
    threads: int | None = None  # also 'default' in the file: the server's own

    @field_validator("threads", mode="before")
    @classmethod
    def _default_threads(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip().isdigit():
            if value.strip().lower() != "default":
                low, high = RANGES["threads"]
                raise _Bad(f"must be an integer from {low} to {high}, or 'default' (the server's own); got {value!r}")
            return None
        return value

    @field_validator(*SETTINGS)
    @classmethod
    def _in_range(cls, value: Any, info: ValidationInfo) -> Any:
        result = _value(str(info.field_name), value)  # _Bad is a ValueError: pydantic reports it at its line
        return list(result) if isinstance(result, tuple) else result

    def changes(self) -> dict[str, Any]:
        """The settings the file gives, by name."""
        return {key: getattr(self, key) for key in SETTINGS if key in self.model_fields_set}


class DeploymentFile(BaseModel):
    """A file of several deployments: ``deployments: [{name: ..., ...}, ...]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deployments: list[DeploymentSpec] = Field(min_length=1)


def _explain(err: ErrorDetails) -> str | None:
    error = err.get("ctx", {}).get("error")
    return str(error) if isinstance(error, _Bad) else None


def read_deployments(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The deployments a YAML file gives, as (model name, settings to change): one mapping with ``name``, or
    ``deployments:`` and a list of them. Every mistake is one ``InvalidInput`` with the line it is on."""
    data, lines = configfile.read(path, "deployment")
    what = "deployment file"
    if isinstance(data, dict) and "deployments" not in data:
        one = configfile.parse(data, DeploymentSpec, what=what, source=str(path), lines=lines, explain=_explain)
        return [(one.name, one.changes())]
    many = configfile.parse(
        data, DeploymentFile, what=what, source=str(path), lines=lines, list_key="deployments", explain=_explain
    )
    seen: dict[str, int] = {}
    for i, spec in enumerate(many.deployments):
        if spec.name in seen:
            line = lines.get(("deployments", str(i), "name"))
            where = f"line {line}: " if line else ""
            raise InvalidInput(
                f"{path}: {where}model {spec.name!r} is deployed twice (also item {seen[spec.name] + 1}); "
                "give each model once"
            )
        seen[spec.name] = i
    return [(spec.name, spec.changes()) for spec in many.deployments]


# --- the registry's methods ---------------------------------------------------------------------


class DeploymentMethods:
    """The deployment methods of :class:`~maas.registry.registry.Registry`."""

    store: MetadataStore

    def deploy(self, name: str, *, reset: bool = False, **changes: Any) -> Deployment:
        """Change how servers serve model ``name``: ``changes`` (settings by name, e.g. ``max_batch_size=32``)
        merged into its deployment, or into the defaults with ``reset``. Running servers follow within about 2 s.

        ``NotFound`` for a model that is not registered; ``InvalidInput`` for an unknown setting or a value out of
        range, and nothing changes. The revision counts up when a value changed.
        """
        values = {**defaults(), **changes} if reset else changes
        return self.store.put_deployment(validate_name(name), values)

    def get_deployment(self, name: str) -> Deployment:
        """The deployment of model ``name``: the stored one, else the defaults (revision 0); ``NotFound`` for a
        model that is not registered."""
        name = validate_name(name)
        return self.store.get_deployment(name) or Deployment(name)

    def list_deployments(self) -> list[Deployment]:
        """Every stored deployment, by model name, in one query (a server polls it); a model not listed runs with
        the defaults."""
        return self.store.list_deployments()

    def undeploy(self, name: str) -> bool:
        """Put model ``name`` back on the defaults; whether it had a deployment."""
        return self.store.delete_deployment(validate_name(name))
