"""The OpenAI wire protocol: request models, what this endpoint refuses, and the error shape.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with the status an
OpenAI client expects. Options the engine cannot honour are refused with a 400 that names them, never
silently ignored: a request either means what the caller asked or is refused.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300
MAX_PROMPTS = 32
GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy decoding, as in vLLM (dividing logits by 1e-40 overflows them)."""
_TOKEN_ID = re.compile(r"[0-9]{1,9}")


class OpenAIError(Exception):
    """An error returned to the client in the OpenAI shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        kind: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or error_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_type(status: int) -> str:
    """Return the OpenAI error ``type`` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def send_error(send, status: int, message: str, code: str | None, headers: dict[str, str]) -> None:
    """Answer from an ASGI middleware, before the application has seen the request."""
    from starlette.responses import JSONResponse

    response = JSONResponse(error_body(message, error_type(status), None, code), status, headers=headers)
    await response({"type": "http"}, _disconnected, send)


async def _disconnected() -> dict[str, str]:
    return {"type": "http.disconnect"}


class _Request(BaseModel):
    # Unknown fields are kept so that check_supported can name them in its refusal.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bounded_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(value)}")
        for token, bias in value.items():
            # ASCII digits only, at most nine: str.isdigit() also takes superscripts ("²"), which int() refuses,
            # and int() refuses strings of more than 4,300 digits.
            if not _TOKEN_ID.fullmatch(token):
                raise ValueError("logit_bias keys must be token ids (1 to 9 ASCII digits)")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values must be between -100 and 100")
        return value

    @property
    def stops(self) -> list[str]:
        """The stop strings, empty ones left out (an empty string would stop every answer at once)."""
        return [s for s in ([self.stop] if isinstance(self.stop, str) else (self.stop or [])) if s]

    @property
    def sampling_temperature(self) -> float:
        """The temperature to sample at: 0 (greedy) below ``GREEDY_BELOW``."""
        return 0.0 if self.temperature < GREEDY_BELOW else self.temperature

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = ""
    name: str | None = Field(default=None, max_length=256)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    prompt_variables: dict[str, str] | None = Field(default=None, max_length=16)
    """nightshift's extension: values of the served prompt template's variables (serving/prompting.py)."""

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=128)
    suffix: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """Return the prompts as a list of strings or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            return []
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()

# Options a caller may send with their neutral value; anything else is refused by name.
_NEUTRAL: dict[str, Any] = {
    "tools": ([], None), "tool_choice": ("none", None), "functions": ([], None), "function_call": ("none", None),
    "parallel_tool_calls": (True, False, None), "response_format": ({"type": "text"}, None),
    "audio": (None,), "modalities": (["text"], None), "prediction": (None,), "store": (False, None),
    "metadata": (None, {}), "reasoning_effort": (None,), "service_tier": ("auto", "default", None),
    "web_search_options": (None,), "top_k": (None, -1, 0), "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "verbosity": (None,),
}


# What a chat message may carry besides role, content and name, with the values that mean "nothing"
# (clients echo a previous assistant turn back whole); anything else in a message is refused by name.
_MESSAGE_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tool_calls": ([], None), "function_call": (None,), "refusal": (None,), "audio": (None,), "annotations": ([], None),
}


def lone_surrogate(value: Any, path: str) -> str | None:
    """Return the path of the first string (or key) in ``value`` holding a lone surrogate, which is no text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate(key, path) or lone_surrogate(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if found := lone_surrogate(item, f"{path}[{i}]"):
                return found
    return None


def _nested_unknown(req: _Request) -> list[str]:
    """Return the dotted names of fields inside messages and content parts that this endpoint does not know."""
    if not isinstance(req, ChatRequest):
        return []
    unknown = []
    for i, message in enumerate(req.messages):
        for name, value in (message.model_extra or {}).items():
            if name == "tool_call_id" and message.role == "tool" and isinstance(value, str) and len(value) <= 256:
                continue
            if value not in _MESSAGE_NEUTRAL.get(name, ()):
                unknown.append(f"messages[{i}].{name}")
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                unknown += [f"messages[{i}].content[{j}].{name}" for name in (part.model_extra or {})]
    return unknown


def check_supported(req: _Request) -> None:
    """Raise a 400 naming every option this endpoint cannot honour."""
    if where := lone_surrogate(req.model_dump(mode="python"), ""):
        where = where[:120]
        raise OpenAIError(400, f"Invalid value for '{where}': a string holds a lone surrogate (\\ud800-\\udfff "
                          "escape without its pair), which is not text. Send valid UTF-16 pairs or UTF-8.",
                          param=where, code="invalid_unicode")
    unsupported: list[str] = []
    unknown: list[str] = []
    for name, value in (req.model_extra or {}).items():
        if name in _NEUTRAL:
            if value not in _NEUTRAL[name]:
                unsupported.append(name)
        else:
            unknown.append(name)
    if req.n != 1:
        unsupported.append("n")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            unsupported.append("best_of")
        if req.suffix:
            unsupported.append("suffix")
    if isinstance(req, ChatRequest):
        kinds = {part.type for m in req.messages if isinstance(m.content, list) for part in m.content}
        if kinds - {"text"}:
            raise OpenAIError(
                400, f"Unsupported content part type(s) {sorted(kinds - {'text'})}: this model reads text only.",
                param="messages", code="unsupported_content",
            )
        if req.top_logprobs and not req.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
    unknown += _nested_unknown(req)
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {', '.join(sorted(unknown))}",
                          param=sorted(unknown)[0], code="unrecognized_argument")
    if unsupported:
        names = ", ".join(sorted(unsupported))
        raise OpenAIError(
            400, f"Unsupported option(s) for this endpoint: {names}. Leave them out or set them to their defaults.",
            param=sorted(unsupported)[0], code="unsupported_option",
        )


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Return a one-line message and the offending parameter for pydantic/FastAPI validation errors."""
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ("We could not parse the JSON body of your request. The body must be valid JSON "
                "(see https://platform.openai.com/docs/api-reference).", None)
    param = ".".join(loc) if loc else None
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if param is None:
        return f"Invalid request body: {message}.", None
    return f"Invalid value for '{param}': {message}.", param


MAX_CORRECTION_CHARS = 16_000
MAX_COMMENT_CHARS = 4_000


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: a rating of one answer, with an optional corrected answer and comment."""

    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_-]+$")
    """The ``id`` of the answer (``chatcmpl-...`` or ``cmpl-...``)."""
    rating: int = Field(ge=-1, le=1)
    """-1 (bad), 0 (neutral) or 1 (good)."""
    correction: str | None = Field(default=None, max_length=MAX_CORRECTION_CHARS)
    """What the answer should have been."""
    comment: str | None = Field(default=None, max_length=MAX_COMMENT_CHARS)
