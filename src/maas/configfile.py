"""One loader for every config file: YAML (or an already loaded mapping) in, a validated pydantic model out.

Every mistake becomes one ``InvalidInput`` that lists each problem with its key path, the line of the file it
is on, what was wrong and what is valid (for an unknown key: the valid keys, and the nearest one). YAML is read
with ``yaml.safe_load`` only; lines come from the composed node tree (``yaml.compose``, ``SafeLoader``).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from maas.errors import InvalidInput

__all__ = ["Explain", "KeyPath", "format_errors", "key_lines", "load", "parse", "read"]

M = TypeVar("M", bound=BaseModel)
KeyPath = tuple[str, ...]  # keys and list indices (as strings) from the top of the document
#: Rewords one pydantic error for a config's own vocabulary; None keeps the loader's wording.
Explain = Callable[[ErrorDetails], str | None]

_SCALARS = (str, int, float, bool, type(None))


def key_lines(text: str) -> dict[KeyPath, int]:
    """The 1-based line of each key and list item of a YAML document, by key path.

    A node reached again through an alias is walked once, so a document of nested aliases costs no more than
    its text; keys inside an aliased subtree are located by the key that holds the alias.
    """
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[KeyPath, int] = {}
    seen: set[int] = set()

    def walk(node: yaml.Node, path: KeyPath) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines.setdefault((*path, str(key.value)), key.start_mark.line + 1)
                    walk(value, (*path, str(key.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault((*path, str(i)), item.start_mark.line + 1)
                walk(item, (*path, str(i)))

    if root is not None:
        walk(root, ())
    return lines


def read(path: str | Path, what: str = "config") -> tuple[Any, dict[KeyPath, int]]:
    """A YAML file's data and the line of each of its keys; ``InvalidInput`` if it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{what} file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path} is not UTF-8 text: {exc}") from None
    try:
        return yaml.safe_load(text), key_lines(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{path} is not valid YAML: {exc}") from None


def load(
    path: str | Path,
    model: type[M],
    *,
    what: str = "config",
    list_key: str | None = None,
    explain: Explain | None = None,
) -> M:
    """Read the YAML file at ``path`` and validate it as ``model``; see :func:`parse`."""
    data, lines = read(path, what)
    return parse(data, model, what=what, source=str(path), lines=lines, list_key=list_key, explain=explain)


def parse(
    data: Any,
    model: type[M],
    *,
    what: str = "config",
    source: str = "config",
    lines: Mapping[KeyPath, int] | None = None,
    list_key: str | None = None,
    explain: Explain | None = None,
) -> M:
    """Validate ``data`` as ``model``; every problem in one ``InvalidInput`` (``"{source} is not a valid {what}"``).

    ``lines`` (from :func:`key_lines`) puts the line of each problem in the message. With ``list_key``, a list
    at the top is taken as the value of that key (a recipe may be just its steps).
    """
    lines = lines or {}
    if list_key is not None and isinstance(data, list):
        data = {list_key: data}
        lines = {(list_key, *path): line for path, line in lines.items()}
    if not isinstance(data, dict):
        required = [name for name, field in model.model_fields.items() if field.is_required()]
        keys = ", ".join(required or list(model.model_fields)[:3])
        also = f", or a list of {list_key}" if list_key else ""
        raise InvalidInput(f"{source} must be a YAML mapping of keys ({keys}, …){also}; {_describe(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(format_errors(exc, model, what=what, source=source, lines=lines, explain=explain)) from None


def format_errors(
    exc: ValidationError,
    model: type[BaseModel],
    *,
    what: str = "config",
    source: str = "config",
    lines: Mapping[KeyPath, int] | None = None,
    explain: Explain | None = None,
) -> str:
    """One line per problem: ``line N: key.path: what was wrong`` (the line when ``lines`` knows it), in the
    order of the file."""
    problems: list[tuple[int, str]] = []
    for err in exc.errors():
        path, node = _locate(model, tuple(err["loc"]))
        kind = err["type"]
        ctx = err.get("ctx", {})
        message = explain(err) if explain is not None else None
        if kind in ("union_tag_invalid", "union_tag_not_found") and "discriminator" in ctx:
            path = (*path, str(ctx["discriminator"]).strip("'\""))  # the key that chooses, as written in the file
        where = ".".join(path) or "(top level)"
        if message is not None:
            text = f"{where}: {message}"
        elif kind == "extra_forbidden":
            text = f"unknown key {where!r}{_valid_keys(model, tuple(err['loc'][:-1]), path[-1])}"
        elif kind == "missing":
            text = f"missing key {where!r}; it is required"
        elif kind == "union_tag_invalid":
            text = f"{where}: unknown value {ctx.get('tag')!r}; valid values: {ctx.get('expected_tags')}"
        elif kind == "union_tag_not_found":
            tags = ", ".join(repr(t) for t in _tags(node, path[-1]))
            text = f"{where}: missing; give one of {tags}"
        else:
            text = f"{where}: {err['msg'].removeprefix('Value error, ')}{_got(err)}"
        line = _line(lines or {}, path)
        problems.append((line or 0, f"  - line {line}: {text}" if line else f"  - {text}"))
    problems.sort(key=lambda problem: problem[0])  # stable: pydantic's order within a line
    return "\n".join([f"{source} is not a valid {what}:", *(text for _, text in problems)])


def _describe(data: Any) -> str:
    if data is None:
        return "it is empty"
    kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return f"it is {kind.get(type(data), type(data).__name__)}"


def _got(err: ErrorDetails) -> str:
    if "input" not in err or not isinstance(err["input"], _SCALARS):
        return ""  # a mapping or list would repeat the whole section
    shown = repr(err["input"])
    return f" (got {shown[:77] + '...' if len(shown) > 80 else shown})"


def _line(lines: Mapping[KeyPath, int], path: KeyPath) -> int | None:
    """The line of ``path``, else of the nearest key above it that is in the file (a missing key's section)."""
    for end in range(len(path), 0, -1):
        if (line := lines.get(path[:end])) is not None:
            return line
    return None


def _valid_keys(model: type[BaseModel], parent_loc: tuple[int | str, ...], key: str) -> str:
    models = [o for o in _options(_locate(model, parent_loc)[1]) if _is_model(o)]
    if len(models) != 1:
        return ""
    valid = list(models[0].model_fields)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(valid)}"


def _tags(node: Any, discriminator: str) -> list[Any]:
    tags: list[Any] = []
    for option in _options(node):
        field = option.model_fields.get(discriminator) if _is_model(option) else None
        if field is not None and get_origin(field.annotation) is Literal:
            tags.extend(get_args(field.annotation))
    return tags


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _options(annotation: Any) -> list[Any]:
    """The alternatives of an annotation: ``Annotated`` and unions unwrapped, ``None`` left out."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _options(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [option for arg in get_args(annotation) for option in _options(arg)]
    return [] if annotation is None or annotation is type(None) else [annotation]


def _locate(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[KeyPath, Any]:
    """The key path a pydantic error location stands for in the file, and the annotation found there.

    Pydantic puts the chosen member of a union in the location (``steps.0.prune.amount``: ``prune`` is the
    step's ``type``); it is not a key of the file, so it is dropped from the path.
    """
    node: Any = model
    path: list[str] = []
    for part in loc:
        node, written = _step(node, part)
        if written:
            path.append(str(part))
    return tuple(path), node


def _step(node: Any, part: int | str) -> tuple[Any, bool]:
    """The annotation one location part further in, and whether that part is a key or index of the file."""
    options = _options(node)
    models = [o for o in options if _is_model(o)]
    if len(models) > 1:  # a union of models: the part may name the member rather than a key
        for m in models:
            literals = [get_args(f.annotation) for f in m.model_fields.values() if get_origin(f.annotation) is Literal]
            if isinstance(part, str) and (part == m.__name__ or any(part in values for values in literals)):
                return m, False
    for m in models:
        if isinstance(part, str) and part in m.model_fields:
            return m.model_fields[part].annotation, True
    for option in options:
        origin, args = get_origin(option), get_args(option)
        if isinstance(part, int) and origin in (list, tuple, set, frozenset):
            if origin is tuple and args and args[-1] is not Ellipsis:
                return (args[part] if part < len(args) else None), True
            return (args[0] if args else None), True
        if isinstance(part, str) and origin is dict:
            return (args[1] if len(args) == 2 else None), True
    return None, True
