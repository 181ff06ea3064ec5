"""Model names, alias names and model URIs: ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``.

Names are validated here, once; a name is never used to build a file path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from maas.errors import InvalidInput

MAX_NAME_LENGTH = 128
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
#: Pseudo-alias that always means the newest version; it cannot be set.
LATEST = "latest"


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ``InvalidInput`` saying what is allowed."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("model name is empty; use letters, digits, '-', '_' and '.'")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"model name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    if ".." in name or not _NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid model name {name!r}: use letters, digits, '-', '_' and '.', starting with a letter or digit, "
            "with no '..' and no path separators (e.g. 'digits' or 'minilm-int8')"
        )
    return name


def validate_alias(alias: str, *, settable: bool = True) -> str:
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise InvalidInput(
            f"invalid alias {alias!r}: use lowercase letters, digits, '-' and '_', starting with a letter "
            "(e.g. 'production', 'staging')"
        )
    if settable and alias == LATEST:
        raise InvalidInput("'latest' always means the newest version and cannot be set; choose another alias")
    if alias.isdigit():
        raise InvalidInput(f"alias {alias!r} looks like a version number")
    return alias


MAX_VERSION = 2**31 - 1


def parse_version(text: str) -> int:
    """A version number from text: ASCII digits, 1 to 2**31-1 (the database's integer)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or not 1 <= int(text) <= MAX_VERSION:
        raise InvalidInput(f"invalid version {text!r}: versions are whole numbers from 1")
    return int(text)


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference to a model: by name alone, by version, or by alias."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"models:/{self.name}/{self.version}"
        if self.alias is not None:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}"


def parse_ref(text: str) -> ModelRef:
    """Parse ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME``, or the same without the
    ``models:/`` prefix (``NAME/VERSION``, ``NAME@ALIAS``, ``NAME``)."""
    if not isinstance(text, str) or not text:
        raise InvalidInput("empty model reference; use models:/NAME/VERSION or models:/NAME@ALIAS")
    body = text[len("models:/") :] if text.startswith("models:/") else text
    if "://" in body or body.startswith("/"):
        raise InvalidInput(f"invalid model URI {text!r}; use models:/NAME/VERSION or models:/NAME@ALIAS")
    if "@" in body:
        name, _, alias = body.partition("@")
        return ModelRef(validate_name(name), alias=validate_alias(alias, settable=False))
    if "/" in body:
        name, _, version = body.partition("/")
        if "/" in version:
            raise InvalidInput(f"invalid model URI {text!r}; use models:/NAME/VERSION or models:/NAME@ALIAS")
        return ModelRef(validate_name(name), version=parse_version(version))
    return ModelRef(validate_name(body))
