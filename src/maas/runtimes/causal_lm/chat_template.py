"""A model's chat template, compiled and rendered as transformers does, but in a bounded jinja2 sandbox.

The template comes with the model file, so it is untrusted: it runs in ``ImmutableSandboxedEnvironment`` (no
attribute access to internals, no mutating the messages, ranges bounded), with the helpers templates expect from
transformers (``raise_exception``, ``strftime_now``, the ``tojson`` filter, ``{% generation %}`` blocks, loop
controls). A template that does not compile, or that fails on the messages it is given, is ``InvalidInput``.

Short prompts render on the server's event loop, so a render is bounded relative to what it is given (``given``:
characters and items of the messages and other variables): no text, list or integer it builds, nor its output,
exceeds ``4 * given + MARGIN`` characters or items (:data:`MAX_INT_BITS` bits), checked before the operations that
multiply (``*``, ``**``, printf and format widths, ``center``, ``replace``, ``join``...); all it makes, at every
level (macros, ``{% set %}`` blocks), and every value measured before it becomes text (a list repeated inside a
list counts each time) add up to at most ``WORK`` times that; loop iterations, calls and filters to
``STEPS + given``. The counting filters ``maas.*`` are put into the template's loops, outputs, ``~`` and slices
as it is parsed, so no expression escapes them; a render past a limit is ``InvalidInput``.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
from collections.abc import Callable, ItemsView, KeysView, ValuesView
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, pass_context
from jinja2.visitor import NodeTransformer

from maas.errors import InvalidInput
from maas.runtimes.base import brief

#: Characters (or items) a render may build beyond four times what it is given.
MARGIN = 1 << 16
#: Loop iterations, calls and filters a render may run beyond one per character it is given.
STEPS = 20_000
#: Everything a render makes, in all, in multiples of its size limit.
WORK = 16
#: Bits of the largest integer a template may compute.
MAX_INT_BITS = 8192
_SIZED = (str, bytes, list, tuple, dict, set, frozenset)
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT = re.compile(r"\{[^{}]*?:([^{}]*)(\{?)")
#: Filters that never turn their input into text (the others are measured first).
_STRUCTURAL_NAMES = (
    "length count first last default d attr abs round map select reject selectattr rejectattr batch slice groupby "
    "dictsort sort unique min max sum list items reverse random int float"
)
_STRUCTURAL = frozenset(_STRUCTURAL_NAMES.split())


class _Budget:
    """What one render may still do (see the module docstring)."""

    def __init__(self, given: int) -> None:
        self.size = 4 * given + MARGIN
        self.steps = STEPS + given
        self.work = WORK * self.size

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise SecurityError("the chat template runs too many loop iterations, calls and filters")

    def fits(self, n: int, what: str = "a value") -> None:
        if n > self.size:
            raise SecurityError(f"the chat template builds {what} of {n:,} characters or items (at most {self.size:,})")

    def charge(self, n: int) -> None:
        self.work -= n
        if self.work < 0:
            raise SecurityError("the chat template builds too much text")

    def made(self, value: Any) -> Any:
        """``value``, just made: within the size limit, and counted."""
        if isinstance(value, int):
            _check_bits(value.bit_length())
        if isinstance(value, _SIZED):
            self.fits(len(value))
            self.charge(len(value))
        return value

    def shown(self, value: Any) -> None:
        """``value`` is about to be turned into text: measured (that text's size, about) and counted."""
        n = len(value) if isinstance(value, str) else _weight(value, self.size)
        self.fits(n)
        self.charge(n)


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("maas_chat_template_budget", default=None)


def _budget() -> _Budget:
    """The budget of the render under way; outside one (jinja2 folding constants as it compiles), a fresh one."""
    return _BUDGET.get() or _Budget(0)


def _weight(value: Any, limit: int) -> int:
    """Characters and items of ``value``, containers walked as trees (one list held twice counts twice): about the
    size of its text. Counting stops past ``limit``."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, Namespace):
            stack.append(getattr(item, "_Namespace__attrs", {}))
        elif isinstance(item, dict):
            total += len(item) + 1
            stack.extend(item.items())
        elif isinstance(item, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
            total += len(item) + 1
            stack.extend(item)
        else:
            total += 1
    return total


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise SecurityError(f"the chat template computes an integer of more than {MAX_INT_BITS} bits")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _check_printf(budget: _Budget, fmt: str) -> None:
    for width, precision in _PRINTF.findall(fmt):
        for n in (width, precision):
            if n == "*" or (n and (len(n) > 9 or int(n) > budget.size)):
                raise SecurityError(f"the chat template formats with a width or precision of {n}")


def _check_format(budget: _Budget, fmt: str) -> None:
    for spec, nested in _FORMAT.findall(fmt):
        if nested or any(len(n) > 9 or int(n) > budget.size for n in re.findall(r"\d+", spec)):
            raise SecurityError("the chat template formats with a width or precision out of bounds")


def _check_replace(budget: _Budget, text: Any, old: Any, new: Any, count: Any) -> None:
    if isinstance(text, (str, bytes)) and type(old) is type(new) is type(text):
        n = text.count(old) if old else len(text) + 1  # type: ignore[arg-type]  # old: the type of text
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        budget.fits(len(text) + n * max(0, len(new) - len(old)))


def _check_method(
    budget: _Budget, owner: str | bytes, name: str, args: tuple[Any, ...], kwargs: Any
) -> tuple[Any, ...]:
    """Checks a call of a string's method before it runs; its arguments (an iterable to join: as a list)."""
    if name == "join" and args:
        args = (list(args[0]), *args[1:])
        budget.fits(_weight(args[0], budget.size) + len(owner) * len(args[0]))
    for arg in (*args, *kwargs.values()):
        budget.shown(arg)
    first = args[0] if args else None
    if name in ("ljust", "rjust", "center", "zfill"):
        budget.fits(_int(first if args else kwargs.get("width")) or 0)
    elif name == "expandtabs":
        tab = _int(first if args else kwargs.get("tabsize", 8)) or 0
        budget.fits(len(owner) + (owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")) * tab)
    elif name == "replace" and len(args) >= 2:
        _check_replace(budget, owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name in ("format", "format_map") and isinstance(owner, str):
        _check_format(budget, owner)
    elif name == "translate" and isinstance(first, dict):
        longest = max((len(v) for v in first.values() if isinstance(v, (str, bytes))), default=1)
        budget.fits(len(owner) * max(1, longest))
    return args


def _arg(rest: tuple[Any, ...], kwargs: Any, index: int, name: str, default: Any) -> Any:
    return rest[index] if len(rest) > index else kwargs.get(name, default)


def _check_filter(budget: _Budget, name: str, value: Any, rest: tuple[Any, ...], kwargs: Any) -> Any:
    """Checks, before it runs, a filter that can make more than it is given; its value (an iterable: as a list)."""
    if name == "center":
        budget.fits(_int(_arg(rest, kwargs, 0, "width", 80)) or 0)
    elif name == "indent":
        width = _arg(rest, kwargs, 0, "width", 4)
        text = str(value)
        budget.fits(len(text) + (text.count("\n") + 1) * (width if isinstance(width, int) else len(str(width))))
    elif name == "wordwrap":
        wrap = _arg(rest, kwargs, 2, "wrapstring", None)
        budget.fits(len(str(value)) * (1 + (len(wrap) if isinstance(wrap, str) else 1)))
    elif name == "replace" and len(rest) >= 2:
        text = str(value)
        _check_replace(budget, text, str(rest[0]), str(rest[1]), _arg(rest, kwargs, 2, "count", None))
    elif name == "format" and isinstance(value, str):
        _check_printf(budget, value)
    elif name in ("batch", "slice"):
        budget.fits(_int(_arg(rest, kwargs, 0, "linecount" if name == "batch" else "slices", 0)) or 0)
    elif name in ("join", "sum"):
        value = list(value)
        joiner = str(_arg(rest, kwargs, 0, "d", "")) if name == "join" else ""
        start = _arg(rest, kwargs, 1, "start", 0) if name == "sum" else ""
        if name == "join" or any(isinstance(v, _SIZED) for v in (start, *value)):
            budget.fits(_weight([value, start], budget.size) + len(joiner) * len(value))
    return value


def _metered(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """The filter ``func``, counted as a step, checked and measured (keeps jinja2's ``pass_*`` marker)."""
    offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def metered(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        head, value, rest = args[:offset], args[offset], args[offset + 1 :]
        if name not in _STRUCTURAL:
            for arg in (value, *rest, *kwargs.values()):
                budget.shown(arg)
        value = _check_filter(budget, name, value, rest, kwargs)
        return budget.made(func(*head, value, *rest, **kwargs))

    return metered


@pass_context
def _step(context: Context, value: Any) -> Any:
    _budget().step()
    return value


@pass_context
def _shown(context: Context, value: Any) -> Any:
    _budget().shown(value)
    return value


@pass_context
def _made(context: Context, value: Any) -> Any:
    return _budget().made(value)


def _counted(node: nodes.Node, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Metering(NodeTransformer):
    """Puts the counting filters into a parsed template: a step per loop iteration (and per filtered item), every
    output and ``~`` operand measured, every ``~`` result and slice counted."""

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_counted(child, "maas.shown") for child in node.nodes]
        return node

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.body.insert(0, nodes.ExprStmt(_counted(nodes.Const(None), "maas.step"), lineno=node.lineno))
        if node.test is not None:
            node.test = _counted(node.test, "maas.step")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_counted(child, "maas.shown") for child in node.nodes]
        return _counted(node, "maas.made")

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        self.generic_visit(node)
        return _counted(node, "maas.made") if isinstance(node.arg, nodes.Slice) else node


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the size and work limits of the module docstring."""

    intercepted_binops = frozenset({"+", "-", "*", "**", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Metering().visit(super()._parse(source, name, filename))
        assert isinstance(tree, nodes.Template)
        tree.set_environment(self)
        return tree

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            _check_bits(right * abs(left).bit_length())
        elif operator == "*" and isinstance(left, int) and isinstance(right, int):
            _check_bits(left.bit_length() + right.bit_length())
        elif operator == "*" and (isinstance(left, int) or isinstance(right, int)):
            count, seq = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(seq, _SIZED):
                budget.fits(count * len(seq))
        elif operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
            budget.fits(len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            _check_printf(budget, left)
            budget.shown(right)
        return budget.made(super().call_binop(context, operator, left, right))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, (str, bytes)):
            args = _check_method(budget, owner, str(getattr(target, "__name__", "")), args, kwargs)
        return budget.made(super().call(context, obj, *args, **kwargs))


class _GenerationBlocks(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: Any) -> None:
    _budget().shown(message)
    raise jinja2.exceptions.TemplateError(str(message)[:2000])


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' tojson: unlike jinja2's own, it does not escape HTML characters, which would change the prompt.
    if (indent if isinstance(indent, int) else len(str(indent or ""))) > 16 or len(str(separators)) > 40:
        raise SecurityError("tojson: indent and separators must be short")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    if len(str(fmt)) > 256:
        raise SecurityError("strftime_now: the format is too long")
    return datetime.now().strftime(fmt)


def _environment() -> _BoundedSandbox:
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.filters.pop("urlize", None)  # inserts its arguments once per link: no chat template needs it
    env.filters = {name: _metered(name, func) for name, func in env.filters.items()}
    env.filters |= {"maas.step": _step, "maas.shown": _shown, "maas.made": _made}
    env.globals.pop("lipsum", None)  # generates text of any length: no chat template needs it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template; safe to share between threads (rendering keeps no state)."""

    def __init__(self, source: str) -> None:
        try:
            self._template = _environment().from_string(source)
        except Exception as exc:  # TemplateSyntaxError, and anything else a broken template makes jinja2 raise
            raise InvalidInput(
                f"the model's chat template does not compile ({brief(exc)}); fix the template (tokenizer_config.json "
                "chat_template, chat_template.jinja or the GGUF's tokenizer.chat_template) and register again"
            ) from None
        self.source = source

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool, **context: Any) -> str:
        """The prompt text for ``messages``; ``context`` adds variables (``bos_token``, ``eos_token``, ``tools``...)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidInput("messages must be a list of objects with a role and a content")
        budget = _Budget(_weight([messages, context], 1 << 62))
        token = _BUDGET.set(budget)
        try:
            parts, length = [], 0
            for part in self._template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            ):
                length += len(part)
                budget.fits(length, "a prompt")
                parts.append(part)
            return "".join(parts)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidInput(f"the model's chat template refused the messages: {brief(exc)}") from None
        except Exception as exc:  # whatever the untrusted template's code raises (TypeError, OverflowError, ...)
            raise InvalidInput(
                f"the model's chat template failed on the messages ({brief(exc)}); check each message's role and "
                "content"
            ) from None
        finally:
            _BUDGET.reset(token)
