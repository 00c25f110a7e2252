"""Request bodies of the OpenAI API (https://platform.openai.com/docs/api-reference), strictly validated.

Every model forbids unknown fields and coerces nothing (``strict``: ``"1"`` is not a number, ``true``
is not an integer), so a field the server cannot honour is refused with its name instead of being
ignored. Besides the OpenAI fields, the sampling extras vLLM accepts are here too (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``). Value ranges are checked once, by :class:`~attnkit.engine.SamplingParams`.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT64 = dict(ge=-(2**63), le=2**63 - 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=128)
    stop: Union[str, list[str], None] = Field(None, max_length=16)
    seed: int | None = Field(None, **INT64)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int = Field(0, **INT64)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = Field(0, **INT64)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=1024)
    skip_special_tokens: bool = True

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = Field(16, **INT64)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt tokens' too)
    # OpenAI fields accepted only at their default: the engine has no suffix/best_of
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported by this server (only best_of == n)")
        if self.suffix is not None:
            raise ValueError("suffix is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, **INT64)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, **INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # OpenAI fields accepted only where they ask for nothing: this server has no tool calling
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = Field(None, max_length=0)
    tool_choice: Literal["none"] | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingRequest(_Strict):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, **INT64)
    user: str | None = None

    @model_validator(mode="after")
    def _texts_only(self):
        inp = self.input
        if isinstance(inp, list):
            if not inp:
                raise ValueError("input is an empty list")
            if len(inp) > 2048:
                raise ValueError(f"input has {len(inp)} items; at most 2048 per request")
            if not isinstance(inp[0], str):
                raise ValueError("input as token ids is not supported by this server; send text")
        texts = [inp] if isinstance(inp, str) else inp
        if any(not t for t in texts):
            raise ValueError("input contains an empty string")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)  # type: ignore[arg-type]
