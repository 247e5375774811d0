"""Request bodies of the OpenAI-compatible API, and OpenAI's error shape.

The models are strict on purpose: OpenAI refuses `"max_tokens": "5"` or `true` where a number
belongs, and a lenient server that coerces them hides client bugs. Unknown fields are tolerated
(clients send `user`, `stream_options`, vendor extras) and ignored. NaN and infinity are refused
here, so no sampling code ever sees them.
"""
from __future__ import annotations


from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share; None means "the default", as OpenAI clients send nulls."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    seed: int | None = Field(default=None, ge=-MAX_SEED, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    """`/v1/completions`. `prompt`: a string, a list of strings, token ids or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: 16 (OpenAI's default), less if the context has less room
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """`/v1/chat/completions`: `messages` rendered by the tokenizer's chat template."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None


class APIError(Exception):
    """An error the client caused (or may retry): becomes OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, type: str | None = None,
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error object; the official client reads `error.message` into its exception."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    503: "service_unavailable",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
