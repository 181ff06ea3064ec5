"""The OpenAI API's request bodies as maas takes them: pydantic models that refuse every parameter maas does not
implement (naming it in ``param``) instead of ignoring it, and wrong types or ranges naming the field.

A known OpenAI parameter sent as ``null`` means "not given"; a few are accepted when they ask for nothing
(``response_format: {"type": "text"}``, ``best_of: 1``, ``echo: false``, ``logit_bias: {}``, ``store: false``).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from maas.errors import InvalidInput, NotFound
from maas.serving.llm.types import MAX_TOP_LOGPROBS
from maas.serving.validation import brief

#: Bounds on one request's work beyond its size (MAAS_MAX_REQUEST_BYTES).
MAX_N = 16
MAX_STOPS = 4
MAX_STOP_CHARS = 1000
MAX_MESSAGES = 4096
MAX_EMBEDDING_INPUTS = 2048
MAX_COMPLETION_LOGPROBS = 5
MAX_MODEL_CHARS = 300

#: Known OpenAI parameters maas does not implement, and why.
UNSUPPORTED: dict[str, str] = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": 'only {"type": "text"} is supported (no JSON mode or structured outputs)',
    "logit_bias": "logit_bias is not supported",
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of > 1 is not supported; use n",
    "echo": "echo is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "metadata": "stored completions are not supported",
    "store": "stored completions are not supported",
    "service_tier": "service tiers are not supported",
    "reasoning_effort": "reasoning models are not supported",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "name": "participant names are not supported",
    "tool_calls": "tool calling is not supported",
    "tool_call_id": "tool calling is not supported",
    "refusal": "refusals are not supported in messages",
}
#: Values of unsupported parameters that ask for nothing, accepted as if absent.
NO_OPS: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "best_of": (1,),
    "echo": (False,),
    "logit_bias": ({},),
    "store": (False,),
}


class BadParam(InvalidInput):
    """A request parameter maas refuses; ``param`` names it the way OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFound(NotFound):
    param = "model"
    code = "model_not_found"


class RequestBody(BaseModel):
    """A request body: strict JSON types, no unknown keys, nulls of known keys dropped before validation."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_absent(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = {}
        for key, value in data.items():
            if value is None and (key in cls.model_fields or key in UNSUPPORTED):
                continue
            if key in NO_OPS and any(type(value) is type(ok) and value == ok for ok in NO_OPS[key]):
                continue
            out[key] = value
        return out


class StreamOptions(RequestBody):
    include_usage: bool | None = None


def _stops(value: Any) -> Any:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"must be a string or a list of up to {MAX_STOPS} strings, got {brief(value)}")
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings are allowed, got {len(stops)}")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters long")
    return stops


class _Sampling(RequestBody):
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=512)

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stops(cls, value: Any) -> Any:
        return _stops(value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise BadParam("stream_options is only allowed when stream is true", "stream_options")
        return self


def _text_content(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a string or a non-empty list of text parts, got {brief(value)}")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(
                f"part {i} has type {brief(kind)}; maas serves text only: send parts of the form "
                '{"type": "text", "text": "..."}'
            )
        if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
            raise ValueError(f'part {i} must be exactly {{"type": "text", "text": "..."}}')
        texts.append(part["text"])
    return "\n".join(texts)


class Message(RequestBody):
    role: Literal["system", "developer", "user", "assistant"]
    #: Text parts are joined with newlines.
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        return _text_content(value)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadParam("top_logprobs needs logprobs set to true", "top_logprobs")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_k_logprobs(self) -> int | None:
        """What the engine is asked for: None (no logprobs) or the number of alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


def _prompt(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if len(value) > 1:
            raise ValueError(f"send one prompt per request (got a list of {len(value)}); or use n for more choices")
        return value[0]
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return value
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        raise ValueError("batches of token-id prompts are not supported; send one prompt per request")
    raise ValueError(f"must be a string or a non-empty list of token ids, got {brief(value)}")


class CompletionRequest(_Sampling):
    #: The text, or its token ids.
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        return _prompt(value)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def top_k_logprobs(self) -> int | None:
        return self.logprobs


def _inputs(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(value):,}")
        return value
    if isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
        raise ValueError("token-id inputs are not supported; send the text")
    raise ValueError(f"must be a string or a non-empty list of strings, got {brief(value)}")


class EmbeddingRequest(RequestBody):
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    input: list[str]
    encoding_format: Literal["float", "base64"] | None = None
    #: Accepted only as the model's own width (its embeddings are not trained to be shortened).
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=512)

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        return _inputs(value)


Body = TypeVar("Body", bound=RequestBody)


def parse(cls: type[Body], body: bytes) -> Body:
    """``body`` as ``cls``; :class:`BadParam` naming the first problem otherwise."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        raise _explain(cls, exc.errors(include_url=False)[0]) from None


def _explain(cls: type[RequestBody], error: ErrorDetails) -> BadParam:
    loc, kind = error["loc"], error["type"]
    param = _param(loc)
    if kind == "json_invalid":
        return BadParam(f"the request body is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}")
    if not loc:
        return BadParam("the request body must be a JSON object of parameters")
    if kind == "extra_forbidden":
        key = str(loc[-1])
        reason = UNSUPPORTED.get(key)
        if reason is not None:
            return BadParam(f"unsupported parameter {param!r}: {reason}", param, "unsupported_parameter")
        if len(loc) == 1:
            allowed = ", ".join(sorted(cls.model_fields))
            return BadParam(f"unknown parameter {param!r}; this endpoint takes {allowed}", param, "unknown_parameter")
        return BadParam(f"unknown or unsupported parameter {param!r}", param, "unknown_parameter")
    if kind == "missing":
        return BadParam(f"{param} is required", param)
    if kind == "value_error":
        return BadParam(f"{param}: {error['msg'].removeprefix('Value error, ')}", param)
    got = "" if kind == "too_long" else f" (got {brief(error.get('input'))})"
    return BadParam(f"{param}: {error['msg']}{got}", param)


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def openapi_body(cls: type[RequestBody]) -> dict[str, Any]:
    """``cls`` as an OpenAPI request body (``openapi_extra`` of a route that reads its body itself), its JSON
    schema's definitions inlined so the document needs no ``$defs`` of its own."""
    schema = cls.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline(defs[ref.removeprefix("#/$defs/")] | rest)
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
