"""Request bodies of the OpenAI API (https://platform.openai.com/docs/api-reference), strictly validated.

Every model forbids unknown fields and coerces nothing (``strict``: ``"1"`` is not a number, ``true``
is not an integer), so a field the server cannot honour is refused with its name instead of being
ignored. Besides the OpenAI fields, the sampling extras vLLM accepts are here too (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``), and attnkit's KV budget (``kv_window``,
``attention_sinks``, ``kv_budget``, ``kv_budget_stream``). Value ranges are checked once, by
:class:`~attnkit.engine.SamplingParams`.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT64 = dict(ge=-(2**63), le=2**63 - 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    """OpenAI's ``response_format.json_schema``: the output is JSON valid under ``schema``. ``strict: true``
    also refuses properties and items the schema does not declare (unless it allows them explicitly)."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # required: serve/structured.py says so by name
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (a JSON object) or ``{"type":
    "json_schema", "json_schema": {...}}`` (:class:`JSONSchemaFormat`); see :mod:`attnkit.serve.structured`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsRequest(_Strict):
    """vLLM's ``structured_outputs``: one of ``json`` (a schema, or its JSON text), ``json_object``, ``regex``,
    ``choice``, ``grammar`` (GBNF or Lark); ``disable_any_whitespace`` makes JSON compact (it may also come alone,
    beside a ``response_format`` that gives the schema)."""

    json_: Union[dict, str, None] = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(None, max_length=4096)
    grammar: str | None = None
    disable_any_whitespace: bool = False


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
    # attnkit's KV budget (SamplingParams): attention sinks + a recent window (StreamingLLM), or SnapKV eviction
    kv_window: int | None = Field(None, **INT64)
    attention_sinks: int = Field(4, **INT64)
    kv_budget: int | None = Field(None, **INT64)
    kv_budget_stream: bool = False
    # vLLM's structured outputs (attnkit/serve/structured.py): at most one constraint per request
    guided_json: Union[dict, str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, max_length=4096)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsRequest | None = None

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
    response_format: ResponseFormat | None = None  # as vLLM takes it on completions too (serve/structured.py)
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


class FunctionCall(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCall(_Strict):
    """A call in an assistant message of the history: ``{"id", "type": "function", "function": {name, arguments}}``."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    """A message as OpenAI sends it: an assistant's may carry ``tool_calls`` (its content then may be null),
    a ``tool`` message answers one call by ``tool_call_id``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)
    refusal: None = None  # what a client echoes back of an assistant message of ours

    @model_validator(mode="after")
    def _role_fields(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with tool_calls "
                             "may leave it null)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed in an assistant message, not a {self.role} one")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers); "
                             "other messages may not have one")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object; omitted: no arguments
    strict: bool | None = None  # accepted; a forced call is always held to the schema by the grammar


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, **INT64)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, **INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None  # structured outputs (attnkit/serve/structured.py)
    # tool calling (attnkit/serve/tools.py): default tool_choice "auto" with tools, "none" without
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @model_validator(mode="after")
    def _tools_consistent(self):
        names = [t.function.name for t in self.tools or []]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise ValueError(f"tools has two functions named `{dup}`")
        choice = self.tool_choice
        if (choice == "required" or isinstance(choice, NamedToolChoice)) and not names:
            raise ValueError(f"tool_choice {'required' if choice == 'required' else 'naming a function'} "
                             "needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names the function `{choice.function.name}`, which is not among tools "
                             f"({', '.join(names)})")
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


# --- /v1/responses (https://platform.openai.com/docs/api-reference/responses/create) -------------------------------
# The request's top level; ``input`` items are checked one by one by serve/responses.py (``ResponsesInputItem``), so
# that an error names the item (``input.3.content``) rather than the whole union.

from typing import Annotated, Any  # noqa: E402

from pydantic import Discriminator, Tag  # noqa: E402


class ResponsesInputText(_Strict):
    type: Literal["input_text"]
    text: str


class ResponsesOutputText(_Strict):
    """Assistant text, as a response's own output item carries it when sent back as input."""

    type: Literal["output_text"]
    text: str
    annotations: list[dict] | None = None  # output metadata, ignored
    logprobs: list[dict] | None = None


_ResponsesPart = Annotated[Union[ResponsesInputText, ResponsesOutputText], Field(discriminator="type")]
_ItemStatus = Literal["in_progress", "completed", "incomplete"]


class ResponsesMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[_ResponsesPart]]
    id: str | None = None  # present on output items sent back as input
    status: _ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponsesFunctionCall(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: _ItemStatus | None = None


class ResponsesFunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Union[str, list[ResponsesInputText]]
    id: str | None = None
    status: _ItemStatus | None = None

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_kind(v: object) -> str | None:
    return (v.get("type", "message") if "role" in v or "type" in v else None) if isinstance(v, dict) else None


ResponsesInputItem = Annotated[
    Union[Annotated[ResponsesMessage, Tag("message")], Annotated[ResponsesFunctionCall, Tag("function_call")],
          Annotated[ResponsesFunctionCallOutput, Tag("function_call_output")]],
    Discriminator(_item_kind, custom_error_type="invalid_item",
                  custom_error_message="an input item must be a message ({'role', 'content'}), a function_call or "
                                       "a function_call_output item")]


class ResponsesFunctionTool(_Strict):
    """A function tool in the Responses API's flat shape (chat nests the same fields under ``function``)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ResponsesToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str


class ResponsesTextFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _fields_of_type(self):
        given = [k for k in ("name", "schema_", "description", "strict") if getattr(self, k) is not None]
        if self.type == "json_schema":
            if self.name is None or self.schema_ is None:
                raise ValueError("text.format of type json_schema needs `name` and `schema`")
        elif given:
            raise ValueError(f"text.format of type {self.type} takes no `{given[0].rstrip('_')}`")
        return self


class ResponsesText(_Strict):
    format: ResponsesTextFormat | None = None


class ResponsesRequest(_Strict):
    model: str | None = None
    input: Union[str, list[Any]]  # items: ResponsesInputItem
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, **INT64)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[ResponsesFunctionTool] | None = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], ResponsesToolChoiceFunction, None] = None
    parallel_tool_calls: bool | None = None
    text: ResponsesText | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    # nothing is kept by this server: accepted only as "do not store" / "no previous response"
    store: bool | None = None
    previous_response_id: str | None = None
    truncation: Literal["disabled"] | None = None

    @model_validator(mode="after")
    def _checks(self):
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input is an empty list")
        for k, v in (self.metadata or {}).items():
            if len(k) > 64 or len(v) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return self
