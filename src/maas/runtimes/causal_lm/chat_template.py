"""A model's chat template, compiled and rendered as transformers does, but in jinja2's immutable sandbox.

The template comes with the model file, so it is untrusted: it runs in ``ImmutableSandboxedEnvironment`` (no
attribute access to internals, no mutating the messages, ranges bounded), with the helpers templates expect from
transformers (``raise_exception``, ``strftime_now``, the ``tojson`` filter, ``{% generation %}`` blocks, loop
controls). A template that does not compile, or that fails on the messages it is given, is ``InvalidInput``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from maas.errors import InvalidInput
from maas.runtimes.base import brief


class _GenerationBlocks(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' tojson: unlike jinja2's own, it does not escape HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
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
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidInput(f"the model's chat template refused the messages: {brief(exc)}") from None
        except Exception as exc:  # whatever the untrusted template's code raises (TypeError, OverflowError, ...)
            raise InvalidInput(
                f"the model's chat template failed on the messages ({brief(exc)}); check each message's role and "
                "content"
            ) from None
