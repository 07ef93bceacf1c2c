"""OpenAI request bodies (the fields slmforge serve honours) and error bodies.

Bodies are validated straight from the JSON bytes, strictly: `"stream": "yes"` or `"max_tokens": true`
is a 400 naming the field, not a guess, and a string with a lone surrogate (`"\\ud800"`) is invalid JSON.
Fields we do not know are ignored, as OpenAI-compatible servers do; OpenAI fields we know but do not
implement (best_of, logit_bias, tools, ...) pass only at their defaults, since accepting and ignoring them
would change what the caller gets without saying so. Extensions in the vLLM style: top_k,
repetition_penalty.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def unsupported(*defaults: Any) -> Any:
    """A field type that accepts only `defaults` (compared with their JSON type: `true` is not `1`)."""
    def check(v: Any) -> Any:
        if any(type(v) is type(d) and v == d for d in defaults):
            return v
        raise ValueError(f"not supported by this server (only {' or '.join(map(_json, defaults))})")
    return Annotated[Any, AfterValidator(check)]


def _json(v: Any) -> str:
    import json

    return json.dumps(v)


OnlyNull = unsupported(None)
NoLogitBias = unsupported(None, {})
NoBestOf = unsupported(None, 1)
NoTools = unsupported(None, [])
NoToolChoice = unsupported(None, "none", "auto")
TextFormat = unsupported(None, {"type": "text"})
TextModality = unsupported(None, ["text"])


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)  # 0 = greedy
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=8)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: NoLogitBias = None

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stop if s]


class CompletionBody(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: OnlyNull = None  # insertion
    best_of: NoBestOf = None


class ContentPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # tool calling, structured output and other modalities are not implemented
    tools: NoTools = None
    tool_choice: NoToolChoice = None
    functions: NoTools = None
    function_call: NoToolChoice = None
    response_format: TextFormat = None
    modalities: TextModality = None
    audio: OnlyNull = None
    prediction: OnlyNull = None


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
