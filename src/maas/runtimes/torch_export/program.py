"""The program JSON, walked against an allow-list before torch's deserializer sees it.

Every operator, name, symbolic expression and pytree spec of the program is checked: strings that torch
would pass to ``eval`` (via ``sympy.sympify``), ``exec`` (node names pasted into generated Python),
``importlib`` (pytree specs) or resolve to an arbitrary callable (node targets) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import _SYM_OPS
from torch._export.serde.serialize import _dict_to_dataclass as _untyped_dict_to_dataclass
from torch._export.serde.union import _Union

from maas.runtimes.base import brief
from maas.runtimes.torch_export.archive import refusal
from maas.runtimes.torch_export.symbolic import check_expr

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
#: Parameter, buffer and module paths: dotted parts (``ModuleDict`` keys may hold '-').
FQN = re.compile(r"[A-Za-z0-9_-]{1,256}(\.[A-Za-z0-9_-]{1,256}){0,63}")
_OPERATOR = re.compile(r"torch\.ops\.(aten|prims)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
#: aten operators that read or write files, print or wait: never part of a model maas serves.
_DENIED_OPS = frozenset({"from_file", "save", "_print", "warn", "wait"})
#: Control flow that torch.export emits; no other higher-order operator (call_torchbind, triton kernels, …).
_HIGHER_ORDER = frozenset(
    {"cond", "while_loop", "map_impl", "scan", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
)
#: Python-level operators on sizes (``operator.add``, ``torch.sym_max``, …), named as torch serializes them.
_SYM_OP_NAMES = frozenset(f"{op.__module__}.{op.__name__}" for op in _SYM_OPS)
_DEVICES = frozenset({"cpu", "cuda"})
#: Pytree node types a program's input and output specs may use (no import, no enum lookup).
_TREESPEC_TYPES = frozenset(
    {
        None,
        "builtins.tuple",
        "builtins.list",
        "builtins.dict",
        "collections.OrderedDict",
        "collections.namedtuple",
        "torch.fx.immutable_collections.immutable_list",
        "torch.fx.immutable_collections.immutable_dict",
    }
)

#: JSON -> a torch.export schema dataclass; parses only, checks no types (torch leaves it untyped).
dict_to_dataclass: Callable[[Any, Any], Any] = _untyped_dict_to_dataclass


def _check_target(target: object) -> str | None:
    """Why a node's target (or an operator argument) is refused; None when it is allowed."""
    if not isinstance(target, str):
        return "it is not a string"
    if target in _SYM_OP_NAMES:
        return None
    if target.startswith("torch.ops.higher_order."):
        hop = target.removeprefix("torch.ops.higher_order.")
        return None if hop in _HIGHER_ORDER else f"higher-order operator {hop!r} is not control flow maas runs"
    match = _OPERATOR.fullmatch(target)
    if match is None:
        return "only torch.ops.aten and torch.ops.prims operators (and size arithmetic) are allowed"
    namespace, op, overload = match.groups()
    if op in _DENIED_OPS:
        return f"operator {op!r} touches files or the process"
    resolved = getattr(getattr(getattr(torch.ops, namespace), op, None), overload, None)
    return None if isinstance(resolved, torch._ops.OpOverload) else "this torch has no such operator"


def _enum_free(obj: dict[str, Any]) -> dict[str, Any]:
    if "__enum__" in obj:
        raise ValueError("enum contexts import modules")
    return obj


def _check_treespec(spec: object) -> str | None:
    """Why a pytree spec is refused: torch's reader imports modules named in enum and defaultdict contexts."""
    try:
        if not isinstance(spec, str):
            raise ValueError("not a string")
        protocol, root = json.loads(spec)
        if protocol != 1:
            raise ValueError(f"protocol {protocol!r}")
        stack = [root]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict) or node.get("type") not in _TREESPEC_TYPES:
                raise ValueError(f"node type {node.get('type') if isinstance(node, dict) else node!r}")
            context = node.get("context")
            if isinstance(context, str):
                json.loads(context, object_hook=_enum_free)
            children = node.get("children_spec")
            if not isinstance(children, list):
                raise ValueError("children_spec is not a list")
            stack.extend(children)
    except (ValueError, TypeError, RecursionError) as exc:
        return f"it is not a plain pytree spec of tuples, lists and dicts ({brief(exc)})"
    return None


def _name_rule(pattern: re.Pattern[str], kind: str, *, empty: bool = False) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        ok = isinstance(value, str) and (pattern.fullmatch(value) is not None or (empty and value == ""))
        return None if ok else f"it is not a valid {kind}, and torch pastes it into generated Python code"

    return check


_IS_NAME = _name_rule(_IDENT, "name")
#: The root module's path, and a positional argument's name, are empty.
_IS_PATH = _name_rule(FQN, "path", empty=True)
_IS_ARGUMENT = _name_rule(_IDENT, "name", empty=True)
#: (schema class, field) -> the check of each string in that field (a list field: each item).
_STRING_RULES: dict[tuple[type, str], Callable[[object], str | None]] = {
    **{
        (cls, field): _IS_NAME
        for cls, field in [
            (schema.TensorArgument, "name"),
            (schema.TokenArgument, "name"),
            (schema.GraphArgument, "name"),
            (schema.Node, "name"),
            (schema.SymIntArgument, "as_name"),
            (schema.SymFloatArgument, "as_name"),
            (schema.SymBoolArgument, "as_name"),
            (schema.InputToConstantInputSpec, "name"),
            (schema.GradientToUserInputSpec, "user_input_name"),
            (schema.UserInputMutationSpec, "user_input_name"),
            (schema.ModuleCallSignature, "forward_arg_names"),
            (schema.NamedTupleDef, "field_names"),
        ]
    },
    **{
        (cls, field): _IS_PATH
        for cls, field in [
            (schema.InputToParameterSpec, "parameter_name"),
            (schema.InputToBufferSpec, "buffer_name"),
            (schema.InputToTensorConstantSpec, "tensor_constant_name"),
            (schema.BufferMutationSpec, "buffer_name"),
            (schema.ParameterMutationSpec, "parameter_name"),
            (schema.GradientToParameterSpec, "parameter_name"),
            (schema.ModuleCallEntry, "fqn"),
        ]
    },
    (schema.NamedArgument, "name"): _IS_ARGUMENT,
    (schema.Node, "target"): _check_target,
    (schema.Argument, "as_operator"): _check_target,
    (schema.SymExpr, "expr_str"): check_expr,
    (schema.ModuleCallSignature, "in_spec"): _check_treespec,
    (schema.ModuleCallSignature, "out_spec"): _check_treespec,
    (schema.Device, "type"): lambda v: None if v in _DEVICES else f"device {v!r} is not cpu or cuda",
}
#: (schema class, field) of dicts whose keys are names.
_NAME_KEYS = {
    (schema.Graph, "tensor_values"),
    (schema.Graph, "sym_int_values"),
    (schema.Graph, "sym_bool_values"),
    (schema.Graph, "sym_float_values"),
    (schema.ExportedProgram, "range_constraints"),
    (schema.Argument, "as_string_to_argument"),
}
#: Custom (TorchBind or opaque) objects run their own code when loaded and called.
_REFUSED = (schema.CustomObjArgument, schema.InputToCustomObjSpec)


def _fields(obj: object) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, _Union):
        yield str(obj.type), obj.value
    else:
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            yield f.name, getattr(obj, f.name)


def _shown(value: str) -> str:
    """A string from the file, quoted and cut short for a message."""
    return repr(value) if len(value) <= 60 else repr(value[:57] + "...")


def check_program(path: Path, program: schema.ExportedProgram) -> None:
    """Refuse every string of the program that could reach ``eval``, ``exec``, an import or an arbitrary
    callable (see the package docstring). Clears node metadata (never needed to run the program; torch
    resolves callables named in it) and the guard code (torch ``exec``s it)."""
    refuse = refusal(path)
    program.guards_code = []
    stack: list[tuple[object, tuple[type, str] | None]] = [(program, None)]
    while stack:
        obj, owner = stack.pop()
        if owner in _STRING_RULES and obj is not None and not isinstance(obj, str | list):
            assert owner is not None
            raise refuse(f"the program's {owner[0].__name__}.{owner[1]}", "it is not a string")
        if isinstance(obj, str):
            rule = _STRING_RULES.get(owner) if owner else None
            why = rule(obj) if rule else None
            if why:
                assert owner is not None
                raise refuse(f"the program's {owner[0].__name__}.{owner[1]} {_shown(obj)}", why)
        elif isinstance(obj, list | tuple):
            stack.extend((item, owner) for item in obj)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                if not isinstance(key, str) or (owner in _NAME_KEYS and _IS_NAME(key)):
                    raise refuse(f"the program's key {_shown(str(key))}", "it is not a valid name")
                stack.append((value, owner))
        elif isinstance(obj, _REFUSED):
            raise refuse("the program", "it uses a custom object (TorchBind or opaque), which runs its own code")
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            if isinstance(obj, schema.Node):
                obj.metadata = {}
            if isinstance(obj, schema.Graph) and obj.custom_obj_values:
                raise refuse("the program", "it uses a custom object (TorchBind or opaque), which runs its own code")
            cls = type(obj)
            stack.extend((value, (cls, name)) for name, value in _fields(obj))
        elif obj is not None and not isinstance(obj, int | float | bool):
            raise refuse("the program", f"it holds a {type(obj).__name__} where the schema has none")
