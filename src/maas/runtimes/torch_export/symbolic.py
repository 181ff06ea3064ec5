"""Symbolic size expressions: torch parses them with ``sympy.sympify``, which calls ``eval``.

:func:`check_expr` allows only the Python syntax, names and calls that the sympy expressions torch writes
need, and bounds the powers sympy would evaluate eagerly.
"""

from __future__ import annotations

import ast
import re

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


def check_expr(expr: object) -> str | None:
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
