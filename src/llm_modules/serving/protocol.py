"""The OpenAI wire format: request bodies (validated), response objects, and errors in OpenAI's shape.

Responses are built from the ``openai`` package's own types, so that what we send is what its client parses.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from fastapi.responses import JSONResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice, ChoiceDelta
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 16
MAX_PROMPTS = 32  # /v1/completions: prompts in one request (each is one row of a batch)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the client caused or should know about; becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ------------------------------------------------------------------------------------------- requests
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions. Unknown fields are ignored (clients send many); fields we
    know but do not implement are refused when they ask for more than the default (``unsupported``)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    logprobs: bool | int | None = None

    @field_validator("stop", mode="after")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        values = [value] if isinstance(value, str) else list(value or [])
        if len(values) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(values)}")
        if any(not s for s in values):
            raise ValueError("stop strings must not be empty")
        return values

    def unsupported(self) -> APIError | None:
        checks = [
            ("n", self.n != 1, "n must be 1 (one choice per request)"),
            ("presence_penalty", self.presence_penalty != 0, "presence_penalty is not supported"),
            ("frequency_penalty", self.frequency_penalty != 0, "frequency_penalty is not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("logprobs", bool(self.logprobs), "logprobs are not supported"),
        ]
        for param, failed, message in checks:
            if failed:
                return APIError(400, message, param, "unsupported_parameter")
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> APIError | None:
        if self.tools or self.functions:
            return APIError(400, "tools and functions are not supported by this server", "tools", "unsupported_parameter")
        if self.response_format and self.response_format.get("type", "text") != "text":
            return APIError(400, "only response_format {type: text} is supported", "response_format",
                            "unsupported_parameter")
        return super().unsupported()

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> list[str]:
        prompts = [value] if isinstance(value, str) else list(value)
        if not prompts:
            raise ValueError("give at least one prompt")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        return prompts

    def unsupported(self) -> APIError | None:
        if self.echo:
            return APIError(400, "echo is not supported", "echo", "unsupported_parameter")
        if self.best_of not in (None, 1):
            return APIError(400, "best_of must be 1", "best_of", "unsupported_parameter")
        if self.suffix:
            return APIError(400, "suffix is not supported", "suffix", "unsupported_parameter")
        return super().unsupported()

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def model_card(model_id: str, role: str, created: int, **extra) -> Model:
    return Model(id=model_id, object="model", created=created, owned_by="llm-modules", role=role, **extra)


def chat_completion(request_id: str, model: str, text: str, finish_reason: str, tokens: CompletionUsage,
                    gate_values: list | None) -> ChatCompletion:
    extra = {"gate_values": gate_values} if gate_values is not None else {}
    return ChatCompletion(
        id=request_id, object="chat.completion", created=int(time.time()), model=model,
        choices=[ChatChoice(index=0, message=ChatCompletionMessage(role="assistant", content=text),
                            finish_reason=finish_reason)],
        usage=tokens, **extra,
    )


def chat_chunk(request_id: str, model: str, created: int, delta: ChoiceDelta | None = None,
               finish_reason: str | None = None, tokens: CompletionUsage | None = None,
               gate_values: list | None = None) -> ChatCompletionChunk:
    """One SSE chunk: a delta (with ``finish_reason`` on the last), or the usage chunk (``choices`` empty)."""
    choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)]
    extra = {"gate_values": gate_values} if gate_values is not None else {}
    fields = {"usage": tokens} if tokens is not None else {}
    return ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created, model=model,
                               choices=choices, **fields, **extra)


def text_completion(request_id: str, model: str, created: int, choices: list[CompletionChoice],
                    tokens: CompletionUsage | None = None, gate_values: list | None = None) -> Completion:
    extra = {"gate_values": gate_values} if gate_values is not None else {}
    fields = {"usage": tokens} if tokens is not None else {}
    return Completion(id=request_id, object="text_completion", created=created, model=model, choices=choices,
                      **fields, **extra)


def text_choice(index: int, text: str, finish_reason: str | None) -> CompletionChoice:
    return CompletionChoice.model_construct(index=index, text=text, finish_reason=finish_reason, logprobs=None)


def sse(item: BaseModel | dict | str) -> str:
    """One server-sent event."""
    if isinstance(item, BaseModel):
        data = item.model_dump_json(exclude_unset=True)
    elif isinstance(item, dict):
        data = json.dumps(item)
    else:
        data = item
    return f"data: {data}\n\n"
