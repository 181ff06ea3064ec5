"""``torch.export`` programs (``.pt2`` archives written by ``torch.export.save``).

``torch.export.load`` is not safe on an untrusted file. Its zip reader finds members case-insensitively;
it unpickles pickled weights and constants, and sample inputs that its safe unpickler rejects; it loads
AOTInductor members as native libraries. The program JSON itself reaches ``eval`` (symbolic expressions
go through ``sympy.sympify``), ``exec`` (guard code, and node names pasted into generated Python),
``importlib`` (pytree specs) and any callable reachable from ``torch`` (node targets).

So maas never hands an archive to torch's loader. It reads the archive with :mod:`zipfile` after
checking that its members are exactly the ones ``torch.export.save`` writes (compared the way torch
compares them: case-insensitively), rebuilds weights and constants from their raw bytes (never
unpickled), checks every operator, name, symbolic expression and pytree spec of the program, and gives
only the checked pieces to torch's deserializer. Sample inputs are never given to torch: without them
no guard code is generated, let alone executed.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch._export.serde import schema
from torch._export.serde.serialize import (
    _SYM_OPS,
    ExportedProgramDeserializer,
    deserialize_scalar_type,
)
from torch._export.serde.serialize import _dict_to_dataclass as _untyped_dict_to_dataclass
from torch._export.serde.union import _Union
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
from torch.export.passes import move_to_device_pass
from torch.utils import _pytree as pytree

from maas.errors import InvalidInput
from maas.runtimes.base import brief, resolve_device, select_outputs
from maas.tensors import Signature, TensorSpec

#: Extra file in the archive that names inputs and outputs (written by :func:`maas.runtimes.export.export`).
NAMES_FILE = "maas.json"

_DATATYPES: dict[torch.dtype, str] = {
    torch.float32: "FP32",
    torch.float64: "FP64",
    torch.float16: "FP16",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.uint8: "UINT8",
    torch.uint16: "UINT16",
    torch.uint32: "UINT32",
    torch.uint64: "UINT64",
    torch.bool: "BOOL",
}

# --- the archive's members -------------------------------------------------------------------------------

_PROGRAM = "models/model.json"
_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
#: Every member ``torch.export.save`` writes under the archive's top folder, in the case it writes them.
_FIXED_MEMBERS = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        _PROGRAM,
        _WEIGHTS_CONFIG,
        _CONSTANTS_CONFIG,
        _SAMPLE_INPUTS,
    }
)
_REQUIRED_MEMBERS = ("archive_format", "archive_version", _PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG)
_PAYLOAD_MEMBER = re.compile(r"data/weights/weight_[0-9]{1,9}|data/constants/tensor_[0-9]{1,9}")
_EXTRA_MEMBER = re.compile(r"extra/[A-Za-z0-9_.-]{1,128}")
#: Largest JSON member read (the program of a large model is tens of MB).
_MAX_JSON_BYTES = 1 << 30
_CHUNK = 1 << 20

# --- the program --------------------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
#: Parameter, buffer and module paths: dotted parts (``ModuleDict`` keys may hold '-').
_FQN = re.compile(r"[A-Za-z0-9_-]{1,256}(\.[A-Za-z0-9_-]{1,256}){0,63}")
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

#: Names that a symbolic expression may call (the sympy classes torch writes, and its own sympy functions).
_SYM_CALLS = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor",
        "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan",
        "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
        "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
        "Identity",
    }
)  # fmt: skip
_SYM_CONSTANTS = frozenset({"oo", "zoo", "nan", "pi", "E", "true", "false"})
#: Bare symbol names torch writes: s0, u12, zuf0, …
_SYM_NAME = re.compile(r"[a-z]{1,4}[0-9]{1,9}")
_SYM_KEYWORDS = frozenset(
    {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero", "nonzero"}
    | {"commutative", "precision", "evaluate"}
)
_SYM_STRING = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_SYM_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Constant, ast.Load, ast.keyword, ast.BinOp, ast.UnaryOp, ast.Compare,
    ast.BoolOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitXor, ast.BitAnd,
    ast.BitOr, ast.USub, ast.UAdd, ast.Invert, ast.Not, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
    ast.And, ast.Or,
)  # fmt: skip
_MAX_EXPR = 4096
#: Calls whose second argument is an exponent (or a shift): sympy evaluates them eagerly.
_SYM_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})
#: Powers per expression, and the largest constant exponent: bounds what sympy evaluates eagerly.
_MAX_POWERS, _MAX_EXPONENT = 4, 64

#: JSON -> a torch.export schema dataclass; parses only, checks no types (torch leaves it untyped).
_dict_to_dataclass: Callable[[Any, Any], Any] = _untyped_dict_to_dataclass
#: torch's deserializer keeps its state in a module global and refuses to run twice at once.
_DESERIALIZE = threading.Lock()


def _refusal(path: Path) -> Callable[[str, str], InvalidInput]:
    def refuse(what: str, why: str) -> InvalidInput:
        return InvalidInput(
            f"{path.name}: refusing to load {what}: {why}; maas loads only plain-tensor programs exactly as "
            "torch.export.save writes them (re-export the model with torch.export.save)"
        )

    return refuse


def _plain(name: str) -> bool:
    """A relative path of plain parts: no backslash, no absolute path or drive, no '.', '..' or empty part."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _members(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by their name under its top folder, after refusing every member that is not
    one ``torch.export.save`` writes (see the module docstring)."""
    refuse = _refusal(path)
    infos = zf.infolist()
    if not infos:
        raise InvalidInput(f"{path.name} is an empty zip archive, not a torch.export archive (.pt2)")
    root = infos[0].filename.split("/", 1)[0]
    members: dict[str, zipfile.ZipInfo] = {}
    folded: dict[str, str] = {}
    total = 0
    for info in infos:
        raw = info.filename
        if not _plain(raw):
            raise refuse(f"member {raw!r}", "its name is not a plain relative path (backslash, absolute or '..')")
        if raw.split("/", 1)[0] != root or "/" not in raw:
            raise refuse(f"member {raw!r}", f"the archive must hold one top-level folder ({root!r}) and only it")
        name = raw[len(root) + 1 :]
        # torch's reader finds members case-insensitively: two names that fold alike are one member to it.
        key = name.casefold()
        if key in folded:
            raise refuse(
                f"member {raw!r}",
                f"it collides with {folded[key]!r} (the same name, or one that differs only in case, which torch "
                "reads as the same member)",
            )
        folded[key] = raw
        if key.startswith("data/aotinductor/"):
            raise refuse(f"member {raw!r}", "AOTInductor members are native code")
        if key.startswith(("data/weights/", "data/constants/")) and key.endswith(".pt"):
            raise refuse(f"member {raw!r}", "legacy pickled weights")
        if key.startswith(("data/constants/custom_obj_", "data/constants/opaque_obj_")):
            raise refuse(f"member {raw!r}", "a custom object is pickled, and runs its own code")
        if name not in _FIXED_MEMBERS and not _PAYLOAD_MEMBER.fullmatch(name) and not _EXTRA_MEMBER.fullmatch(name):
            known = key in {m.casefold() for m in _FIXED_MEMBERS} or _PAYLOAD_MEMBER.fullmatch(key)
            why = (
                "its name differs in case from the one torch.export.save writes, and torch finds members "
                "case-insensitively"
                if known
                else "torch.export.save writes no such member"
            )
            raise refuse(f"member {raw!r}", why)
        if info.flag_bits & 0x1:
            raise refuse(f"member {raw!r}", "it is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            raise refuse(f"member {raw!r}", "it is compressed (torch.export.save stores members uncompressed)")
        total += info.file_size
        members[name] = info
    # Stored members cannot add up to more than the archive: a guard against headers that lie.
    if total > path.stat().st_size:
        raise InvalidInput(f"{path.name}: its members claim {total} bytes, more than the archive holds")
    missing = [m for m in _REQUIRED_MEMBERS if m not in members]
    if missing:
        raise InvalidInput(
            f"{path.name} is not a torch.export.save archive: it lacks {', '.join(missing)}; "
            "re-export it with torch.export.save"
        )
    if zf.read(members["archive_format"]) != b"pt2" or zf.read(members["archive_version"]) != b"0":
        raise InvalidInput(
            f"{path.name} is not a torch.export.save archive of this torch version's format "
            f"(torch {torch.__version__}); re-export it with torch.export.save"
        )
    return members


def _json(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    if info.file_size > _MAX_JSON_BYTES:
        raise InvalidInput(f"{path.name}: member {info.filename!r} is larger than {_MAX_JSON_BYTES} bytes")
    try:
        return json.loads(zf.read(info))
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"{path.name}: member {info.filename!r} is not JSON ({brief(exc)})") from None


# --- weights and constants, from raw bytes ------------------------------------------------------------------


def _ints(values: object, what: str, refuse: Callable[[str, str], InvalidInput]) -> list[int]:
    """Sizes, strides or an offset (``[value]``) of a weight: non-negative plain integers."""
    if not isinstance(values, list) or len(values) > 64:
        raise refuse(what, "its sizes and strides must be lists of at most 64 integers")
    out = []
    for value in values:
        number = value.as_int if isinstance(value, schema.SymInt) and value.type == "as_int" else None
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**62:
            raise refuse(what, "its sizes, strides and offset must be non-negative integers")
        out.append(number)
    return out


def _read_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> torch.Tensor:
    """The member's bytes in a uint8 tensor, read in chunks (no second copy of a large weight)."""
    out = torch.empty(info.file_size, dtype=torch.uint8)
    view = out.numpy().data
    pos = 0
    with zf.open(info) as src:  # checks the member's CRC at its end
        while chunk := src.read(_CHUNK):
            if pos + len(chunk) > info.file_size:
                raise zipfile.BadZipFile(f"member {info.filename!r} is longer than its header says")
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
    if pos != info.file_size:
        raise zipfile.BadZipFile(f"member {info.filename!r} is shorter than its header says")
    return out


def _payloads(
    path: Path, zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], kind: str
) -> dict[str, torch.Tensor]:
    """Weights (``kind='weights'``) or constants, each built from its raw bytes and its config's tensor meta."""
    refuse = _refusal(path)
    config_name = _WEIGHTS_CONFIG if kind == "weights" else _CONSTANTS_CONFIG
    prefix = "weight_" if kind == "weights" else "tensor_"
    raw = _json(path, zf, members[config_name])
    config = raw.get("config") if isinstance(raw, dict) else None
    if not isinstance(config, dict):
        raise refuse(config_name, "it is not a payload config (a JSON object with a 'config' object)")
    storages: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.items():
        what = f"{config_name} entry {fqn!r}"
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise refuse(what, f"{fqn!r} is pickled (a tensor subclass or custom object)")
        path_name = meta.get("path_name")
        if kind == "constants" and isinstance(path_name, str) and not path_name.startswith(prefix):
            raise refuse(what, f"{fqn!r} is a custom object")
        if not isinstance(fqn, str) or not _FQN.fullmatch(fqn):
            raise refuse(what, "its name is not a dotted parameter path")
        if (
            not isinstance(path_name, str)
            or not path_name.startswith(prefix)
            or f"data/{kind}/{path_name}" not in members
        ):
            raise refuse(what, f"it names no {prefix}N member of the archive")
        try:
            tensor_meta = _dict_to_dataclass(schema.TensorMeta, meta.get("tensor_meta"))
            dtype = deserialize_scalar_type(tensor_meta.dtype)
            layout = tensor_meta.layout
        except Exception as exc:  # malformed meta: KeyError, AssertionError, TypeError, …
            raise refuse(what, f"its tensor meta is malformed ({brief(exc)})") from None
        if layout != schema.Layout.Strided:
            raise refuse(what, "only dense (strided) tensors are supported")
        sizes = _ints(tensor_meta.sizes, what, refuse)
        strides = _ints(tensor_meta.strides, what, refuse)
        (offset,) = _ints([tensor_meta.storage_offset], what, refuse)
        if len(sizes) != len(strides):
            raise refuse(what, "its sizes and strides differ in length")
        info = members[f"data/{kind}/{path_name}"]
        element = torch.empty((), dtype=dtype).element_size()
        if info.file_size % element:
            raise refuse(what, f"its {info.file_size} bytes are not a whole number of {dtype} elements")
        numel = info.file_size // element
        needed = 0 if 0 in sizes else offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) + 1
        if needed > numel:
            raise refuse(what, f"its shape {sizes} needs {needed} elements, but {path_name} holds {numel}")
        if path_name not in storages:
            storages[path_name] = _read_bytes(zf, info).view(dtype)
        try:
            tensor = torch.as_strided(storages[path_name], sizes, strides, offset)
            if kind == "weights" and meta.get("is_param") is True:
                tensor = torch.nn.Parameter(tensor, requires_grad=bool(tensor_meta.requires_grad))
        except RuntimeError as exc:
            raise refuse(what, brief(exc)) from None
        out[fqn] = tensor
    return out


def _check_sample_inputs(path: Path, zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo]) -> None:
    """Refuse sample inputs that torch's safe unpickler rejects. They are never used: maas does not give them
    to torch (see the module docstring); refusing them keeps archives that would make torch fall back to
    unpickling out of the registry."""
    info = members.get(_SAMPLE_INPUTS)
    if info is None:
        return
    try:
        torch.load(io.BytesIO(zf.read(info)), weights_only=True)
    except Exception as exc:
        raise _refusal(path)(repr(_SAMPLE_INPUTS), "sample inputs that the safe unpickler rejects") from exc


# --- the program JSON ---------------------------------------------------------------------------------------


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


def _small_exponent(node: ast.expr) -> bool:
    """A size symbol, or a number of magnitude at most ``_MAX_EXPONENT``: what torch writes as an exponent.
    Anything else could evaluate (sympy evaluates eagerly) to a huge number to raise to."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    if isinstance(node, ast.Name):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "Symbol":
            return True
        return node.func.id in ("Integer", "Float", "Rational") and all(_small_exponent(a) for a in node.args)
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float | str)
        and not isinstance(node.value, bool)
    ):
        try:
            return abs(float(node.value)) <= _MAX_EXPONENT
        except ValueError:
            return False
    return False


def _check_expr(expr: object) -> str | None:
    """Why a symbolic expression is refused (torch parses it with ``sympy.sympify``, which calls ``eval``)."""
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR:
        return f"it is not a string of at most {_MAX_EXPR} characters"
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "it is not an expression"
    powers = 0
    for node in ast.walk(tree):
        if not isinstance(node, _SYM_NODES):
            return f"it holds Python syntax ({type(node).__name__}) that no sympy expression needs"
        exponent: ast.expr | None = None
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _SYM_CALLS:
                return "it calls something other than a sympy constructor"
            if any(k.arg not in _SYM_KEYWORDS or not isinstance(k.value, ast.Constant) for k in node.keywords):
                return "it passes a keyword that no sympy assumption takes"
            if node.func.id in _SYM_POWERS:
                exponent = node.args[1] if len(node.args) == 2 else node
        elif isinstance(node, ast.Name):
            if node.id not in _SYM_CALLS and node.id not in _SYM_CONSTANTS and not _SYM_NAME.fullmatch(node.id):
                return f"it names {node.id!r}, which is neither a sympy name nor a size symbol"
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str) and not _SYM_STRING.fullmatch(value):
                return "it holds a string that is not a symbol name or a number"
            if isinstance(value, int) and abs(value) > 2**64:
                return "it holds an integer larger than 2**64"
            if not isinstance(value, str | int | float | bool):
                return "it holds a constant that is not a number, name or truth value"
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow | ast.BitXor):  # sympify reads ^ as **
            exponent = node.right
        if exponent is not None:
            powers += 1
            if powers > _MAX_POWERS or not _small_exponent(exponent):
                return f"it raises to a power other than a size symbol or a number up to {_MAX_EXPONENT}"
    return None


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
_IS_PATH = _name_rule(_FQN, "path", empty=True)
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
    (schema.SymExpr, "expr_str"): _check_expr,
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


def _check_program(path: Path, program: schema.ExportedProgram) -> None:
    """Refuse every string of the program that could reach ``eval``, ``exec``, an import or an arbitrary
    callable (see the module docstring). Clears node metadata (never needed to run the program; torch
    resolves callables named in it) and the guard code (torch ``exec``s it)."""
    refuse = _refusal(path)
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


def _deserialize(path: Path, members: Mapping[str, zipfile.ZipInfo], zf: zipfile.ZipFile) -> ExportedProgram:
    raw = _json(path, zf, members[_PROGRAM])
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, raw)
    except Exception as exc:  # the schema's own asserts, KeyError, TypeError, …
        raise InvalidInput(f"{path.name}: {_PROGRAM} is not a torch.export program ({brief(exc)})") from None
    if not isinstance(serialized, schema.ExportedProgram):
        raise InvalidInput(f"{path.name}: {_PROGRAM} is not a torch.export program")
    try:
        _check_program(path, serialized)
    except RecursionError:
        raise InvalidInput(f"{path.name}: {_PROGRAM} is nested too deeply") from None
    state_dict = _payloads(path, zf, members, "weights")
    constants = _payloads(path, zf, members, "constants")
    try:
        with _DESERIALIZE:
            program = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except Exception as exc:
        raise InvalidInput(
            f"torch.export cannot load {path.name}: {brief(exc)}; re-export it with torch.export.save "
            f"(this server runs torch {torch.__version__})"
        ) from None
    program._guards_code = []
    return program


def _load_program(path: Path) -> tuple[ExportedProgram, dict[str, Any]]:
    """The checked program and the contents of its ``maas.json`` (empty when absent)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = _members(path, zf)
            _check_sample_inputs(path, zf, members)
            program = _deserialize(path, members, zf)
            names_info = members.get(f"extra/{NAMES_FILE}")
            names = _json(path, zf, names_info) if names_info is not None and names_info.file_size else {}
    except InvalidInput:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise InvalidInput(f"{path.name} is not a torch.export archive (.pt2): {brief(exc)}") from None
    return program, names if isinstance(names, dict) else {}


def load_program(path: Path) -> ExportedProgram:
    """The program in a ``.pt2`` archive, after the same safety checks as :meth:`TorchExportFormat.load`."""
    return _load_program(path)[0]


# --- the runtime -------------------------------------------------------------------------------------------


def _spec(name: str, node: torch.fx.Node | None, path: Path) -> TensorSpec:
    value = node.meta.get("val") if node is not None else None
    if not isinstance(value, torch.Tensor):
        raise InvalidInput(f"{path.name}: {name!r} is not a tensor ({type(value).__name__}); maas serves tensors only")
    if value.dtype not in _DATATYPES:
        raise InvalidInput(
            f"{path.name}: {name!r} has dtype {value.dtype}, which has no Open Inference Protocol datatype; "
            f"supported: {', '.join(str(d) for d in _DATATYPES)}"
        )
    # Dynamic dimensions are SymInts in the FakeTensor's shape.
    shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return TensorSpec(name=name, datatype=_DATATYPES[value.dtype], shape=shape)


def _names(kind: str, given: Any, default: list[str], path: Path) -> list[str]:
    if given is None:
        return default
    if not isinstance(given, list) or len(given) != len(default) or not all(isinstance(n, str) for n in given):
        raise InvalidInput(
            f"{path.name}: {NAMES_FILE} {kind} must list {len(default)} names, got {given!r}; re-export the model"
        )
    return given


def _signature(program: ExportedProgram, names: Mapping[str, Any], path: Path) -> Signature:
    nodes = {n.name: n for n in program.graph.nodes}
    inputs = [s for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    outputs = [s for s in program.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    in_nodes = [nodes.get(s.arg.name) if isinstance(s.arg, TensorArgument) else None for s in inputs]
    out_nodes = [nodes.get(s.arg.name) if isinstance(s.arg, TensorArgument) else None for s in outputs]
    in_names = _names("input_names", names.get("input_names"), [getattr(s.arg, "name", "") for s in inputs], path)
    out_names = _names("output_names", names.get("output_names"), [f"output_{i}" for i in range(len(outputs))], path)
    return Signature(
        inputs=tuple(_spec(n, node, path) for n, node in zip(in_names, in_nodes, strict=True)),
        outputs=tuple(_spec(n, node, path) for n, node in zip(out_names, out_nodes, strict=True)),
    )


class TorchExportRuntime:
    """One loaded program. The module holds no per-call state, so threads may share it."""

    def __init__(self, program: ExportedProgram, signature: Signature, device: str) -> None:
        self.signature = signature
        self.device = device
        self._module: torch.nn.Module | None = program.module()
        self._in_spec = program.call_spec.in_spec
        # A program that writes into its inputs would write into the caller's arrays: give it copies.
        self._copy_inputs = bool(program.graph_signature.user_inputs_to_mutate)

    def _tensor(self, value: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(value)
        # torch.from_numpy warns on read-only arrays (np.frombuffer of a request body is one).
        if self._copy_inputs or not array.flags.writeable:
            array = array.copy()
        return torch.from_numpy(array).to(self.device)

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        module = self._module
        if module is None:
            raise RuntimeError("this torch.export runtime was closed; load the model again")
        names = select_outputs(self.signature, outputs)
        missing = [s.name for s in self.signature.inputs if s.name not in inputs]
        if missing:
            known = ", ".join(s.name for s in self.signature.inputs)
            raise InvalidInput(f"missing input(s) {', '.join(missing)}; the model takes {known}")
        flat = [self._tensor(inputs[s.name]) for s in self.signature.inputs]
        args, kwargs = pytree.tree_unflatten(flat, self._in_spec) if self._in_spec is not None else (flat, {})
        with torch.inference_mode():
            result = module(*args, **kwargs)
        leaves = pytree.tree_leaves(result)
        by_name = dict(zip((s.name for s in self.signature.outputs), leaves, strict=True))
        return {name: by_name[name].detach().cpu().numpy() for name in names}

    def close(self) -> None:
        self._module = None
        if self.device == "cuda":
            torch.cuda.empty_cache()


class TorchExportFormat:
    """The ``torch_export`` format: ``.pt2`` archives from ``torch.export.save``."""

    name = "torch_export"
    suffixes: tuple[str, ...] = (".pt2",)

    def inspect(self, path: Path) -> Signature:
        program, names = _load_program(path)
        return _signature(program, names, path)

    def load(self, path: Path, *, device: str = "cpu") -> TorchExportRuntime:
        used = resolve_device(device, cuda_available=torch.cuda.is_available(), runtime="torch")
        program, names = _load_program(path)
        signature = _signature(program, names, path)
        if used == "cuda":
            # Moves weights and rewrites device arguments baked into the graph (module.to() would miss those).
            program = move_to_device_pass(program, "cuda")
        return TorchExportRuntime(program, signature, used)


FORMAT = TorchExportFormat()
