"""The Anthropic Messages dialect (``POST /v1/messages`` and
``/v1/messages/count_tokens``), declared once.

Requests are ``WireModel``s; responses and stream events are ``TypedDict``s.
Both sides use them: the HTTP front (``gateway/anthropic/``) parses requests
and renders answers, the Anthropic cloud adapter
(``backends/cloud/anthropic_wire.py``) builds its upstream requests with the
same models and reads the answers against the same shapes, and
``/openapi.json`` is generated from them.  The shapes follow Anthropic's API
reference and the official ``anthropic`` SDK's types (``MessageCreateParams``,
``Message``, ``RawMessageStreamEvent``, ``MessageTokensCount``, the error
objects).

Deliberate choices (gateway/README.md, "Deviations from Anthropic"):

- thinking blocks carry ``signature: ""``: nothing here can sign reasoning,
  and an empty signature says so rather than imitating one; thinking blocks
  sent back are accepted whatever their signature (it is not checked),
  ``redacted_thinking`` blocks are accepted and dropped (they are another
  server's encrypted reasoning);
- ``budget_tokens`` must be at least 1,024 (Anthropic's rule) and is not
  honoured: thinking ends when the model closes it or at ``max_tokens``;
- ``cache_control``, ``metadata``, ``citations``, ``service_tier``,
  ``disable_parallel_tool_use`` and the other fields without meaning here
  are accepted and ignored;
- server tools (web search, code execution, bash, text editor, ...), the
  MCP connector, image URLs and file sources, documents and search results
  are refused with a 400 that says so; the Files and Batches APIs are not
  served (404).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union, get_args

from pydantic import BeforeValidator, Field, model_validator
from typing_extensions import Annotated, NotRequired, TypedDict

from mlxgate import limits
from mlxgate.dialects.base import (
    IMAGE_RULES,
    IMAGE_URL_RULE,
    INT32_MAX,
    Base64Bytes,
    Int32,
    Limit,
    ModelName,
    StopList,
    ToolName,
    WireModel,
    contract_range,
    ignored,
    integer,
    json_type,
)

#: The ``anthropic-version`` this dialect follows (the adapter sends it).
VERSION = "2023-06-01"

Role = Literal["user", "assistant", "system"]
ROLES: tuple[str, ...] = get_args(Role)

StopReason = Literal[
    "end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal", "model_context_window_exceeded"
]
STOP_REASONS: tuple[str, ...] = get_args(StopReason)

#: The contract's finish reason -> ``stop_reason`` (front).  A STOP that a stop
#: sequence caused (``Done.stop_sequence``) is "stop_sequence"; an answer with
#: tool calls is "tool_use" unless it was cut ("max_tokens").
STOP_REASON: dict[str, str] = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                               "cancelled": "end_turn"}
#: An upstream's ``stop_reason`` -> the contract's finish reason (adapter).
FINISH_OF_STOP_REASON: dict[str, str] = {
    "end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length",
    "model_context_window_exceeded": "length", "pause_turn": "stop", "refusal": "stop",
}
assert set(FINISH_OF_STOP_REASON) == set(STOP_REASONS)

#: HTTP status -> Anthropic's error ``type`` (docs: "Errors").  Other 4xx are
#: "invalid_request_error", other 5xx "api_error", as Anthropic documents.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
#: An error ``type`` an upstream sent -> its HTTP status (adapter; an ``error`` event has no status).
STATUS_OF_ERROR_TYPE: dict[str, int] = {t: s for s, t in ERROR_TYPES.items()}

#: Content block types a request may carry; any other (documents, search results,
#: server tool blocks, container uploads) is refused, naming the type.
BlockType = Literal["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"]
BLOCK_TYPES: tuple[str, ...] = get_args(BlockType)

#: Media types of base64 image sources.
ImageMediaType = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]

#: Stream event names, in the order a stream may use them (``event:`` is the data's ``type``).
EVENT_NAMES: tuple[str, ...] = (
    "message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
    "message_delta", "message_stop", "error",
)

_IGNORED = "accepted and ignored"
_CacheControl = Optional[ignored({"type": "object"})]


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


# ---------------------------------------------------------------- content blocks


class TextBlock(WireModel):
    type: Literal["text"]
    text: str
    cache_control: _CacheControl = None
    citations: Optional[ignored({"type": "array"})] = None


class Base64ImageSource(WireModel):
    type: Literal["base64"]
    media_type: ImageMediaType
    data: Annotated[Base64Bytes, Field(description=IMAGE_RULES)]


class URLImageSource(WireModel):
    type: Literal["url"]
    url: str = Field(description=IMAGE_URL_RULE)


class FileImageSource(WireModel):
    type: Literal["file"]
    file_id: str = Field(description="refused (400): the Files API is not served")


ImageSource = Annotated[Union[Base64ImageSource, URLImageSource, FileImageSource], Field(discriminator="type")]


class ImageBlock(WireModel):
    type: Literal["image"]
    source: ImageSource
    cache_control: _CacheControl = None


class ToolUseBlock(WireModel):
    """A call the assistant made (history)."""

    type: Literal["tool_use"]
    id: str
    name: Annotated[ToolName, Field(min_length=1)]
    input: dict[str, Any]
    cache_control: _CacheControl = None


def _known_block(v: Any) -> Any:
    """A clear refusal for the block types this server does not take."""
    if isinstance(v, dict) and isinstance(v.get("type"), str) and v["type"] not in BLOCK_TYPES:
        raise ValueError(
            f"content blocks of type {limits.clip_name(repr(v['type']))} are not supported by this server "
            f"(documents, search results and server tools are not); supported: {', '.join(BLOCK_TYPES)}"
        )
    return v


ToolResultPart = Annotated[Union[TextBlock, ImageBlock], Field(discriminator="type"), BeforeValidator(_known_block)]


class ToolResultBlock(WireModel):
    """What a tool returned (user messages)."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: Optional[Union[str, list[ToolResultPart]]] = None
    is_error: Optional[bool] = Field(None, description=_IGNORED)
    cache_control: _CacheControl = None


class ThinkingBlock(WireModel):
    """Reasoning given back (assistant history); the signature is not checked."""

    type: Literal["thinking"]
    thinking: str
    signature: Optional[str] = Field(None, description="not checked (answers carry an empty one)")


class RedactedThinkingBlock(WireModel):
    """Another server's encrypted reasoning: accepted and dropped."""

    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    Union[TextBlock, ImageBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
    Field(discriminator="type"),
    BeforeValidator(_known_block),
]


class MessageParam(WireModel):
    role: Role = Field(description="user, assistant, or system (its text is added to the system prompt, as most "
                                   "chat templates take a system message only first)")
    content: Union[str, list[ContentBlock]]


# ---------------------------------------------------------------- tools, choices, thinking


class ToolParam(WireModel):
    """A client tool.  Server tools (a ``type`` such as "web_search_20250305") are refused."""

    name: Annotated[ToolName, Field(min_length=1)]
    description: Optional[str] = None
    input_schema: dict[str, Any] = Field(description="JSON schema of the input")
    type: Optional[Literal["custom"]] = None
    cache_control: _CacheControl = None
    strict: Optional[ignored({"type": "boolean"})] = None
    input_examples: Optional[ignored({"type": "array"})] = None
    defer_loading: Optional[ignored({"type": "boolean"})] = None
    eager_input_streaming: Optional[ignored({"type": "boolean"})] = None
    allowed_callers: Optional[ignored({"type": "array"})] = None

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") not in (None, "custom"):
            kind = v["type"]
            shown = limits.clip_name(repr(kind)) if isinstance(kind, str) else json_type(kind)
            raise ValueError(
                f"server tool {shown} is not supported by this server (no web search, code execution, bash, "
                "text editor or other server tools); only client tools (name, description, input_schema)"
            )
        return v


class ToolChoiceAuto(WireModel):
    type: Literal["auto"]
    disable_parallel_tool_use: Optional[bool] = Field(None, description=_IGNORED)


class ToolChoiceAny(WireModel):
    type: Literal["any"]
    disable_parallel_tool_use: Optional[bool] = Field(
        None, description="accepted; a forced call is always exactly one call")


class ToolChoiceTool(WireModel):
    type: Literal["tool"]
    name: Annotated[ToolName, Field(min_length=1)]
    disable_parallel_tool_use: Optional[bool] = Field(
        None, description="accepted; a forced call is always exactly one call")


class ToolChoiceNone(WireModel):
    type: Literal["none"]


ToolChoice = Annotated[
    Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone],
    Field(
        discriminator="type",
        description='"auto" offers the tools; "any" forces one call to one of them; "tool" keeps only the named '
                    'tool and forces a call to it (the MLX engine forces calls for json_tools models; 400 '
                    'otherwise); "none" drops the tools',
    ),
]

ThinkingDisplay = Literal["summarized", "omitted"]


class ThinkingEnabled(WireModel):
    type: Literal["enabled"]
    budget_tokens: integer(1024, INT32_MAX) = Field(
        description="at least 1,024, as Anthropic requires; not honoured (thinking ends when the model closes "
                    "it or at max_tokens)")
    display: Optional[ThinkingDisplay] = Field(None, description=_IGNORED)


class ThinkingDisabled(WireModel):
    type: Literal["disabled"]


class ThinkingAdaptive(WireModel):
    type: Literal["adaptive"]
    display: Optional[ThinkingDisplay] = Field(None, description=_IGNORED)


class ThinkingBetweenTools(WireModel):
    type: Literal["between_tools"]


Thinking = Annotated[
    Union[ThinkingEnabled, ThinkingDisabled, ThinkingAdaptive, ThinkingBetweenTools],
    Field(
        discriminator="type",
        description="enabled (or between_tools): think, reasoning comes back as thinking blocks; disabled: no "
                    "thinking; adaptive or absent: the model's default",
    ),
]


class JSONOutputFormat(WireModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(WireModel):
    format: Optional[JSONOutputFormat] = Field(None, description="structured output: JSON matching the schema")
    effort: Optional[ignored({"type": "string"})] = None


class Metadata(WireModel):
    user_id: Optional[str] = Field(None, description=_IGNORED)


# ---------------------------------------------------------------- requests


class _Input(WireModel):
    """The fields a message and a token count share."""

    model: Annotated[ModelName, Field(min_length=1)]
    messages: Annotated[list[MessageParam], Field(min_length=1), Limit(maxItems=limits.MAX_MESSAGES)]
    system: Optional[Union[str, list[TextBlock]]] = Field(None, description="text blocks are joined by blank lines")
    tools: Optional[Annotated[list[ToolParam], Limit(maxItems=limits.MAX_TOOLS)]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None
    output_config: Optional[OutputConfig] = None
    mcp_servers: Optional[list[Any]] = Field(None, description="the MCP connector is not supported: 400 when not "
                                                               "empty")
    cache_control: _CacheControl = None
    context_management: Optional[ignored({"type": "object"})] = None
    container: Optional[ignored({})] = None


class MessagesRequest(_Input):
    """POST /v1/messages."""

    max_tokens: integer(0, INT32_MAX) = Field(
        description="required, as Anthropic requires it; clamped to the room the model's context leaves")
    stop_sequences: Optional[StopList] = None
    temperature: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    top_p: Optional[Annotated[float, Field(ge=0, le=1)]] = Field(None, description="0 means greedy")
    top_k: Optional[Annotated[Int32, contract_range("top_k")]] = None
    metadata: Optional[Metadata] = None
    stream: Optional[bool] = None
    service_tier: Optional[ignored({"type": "string"})] = None
    inference_geo: Optional[ignored({"type": "string"})] = None
    speed: Optional[ignored({"type": "string"})] = None
    diagnostics: Optional[ignored({"type": "object"})] = None


class CountTokensRequest(_Input):
    """POST /v1/messages/count_tokens."""


# ---------------------------------------------------------------- responses


class ErrorDetail(TypedDict):
    type: str
    message: str


class Error(TypedDict):
    """Every error body, and the ``error`` event that ends a stream that failed."""

    type: Literal["error"]
    error: ErrorDetail


class TextContent(TypedDict):
    type: Literal["text"]
    text: str


class ThinkingContent(TypedDict):
    type: Literal["thinking"]
    thinking: str
    #: Always "" here (nothing can sign); an upstream's is read and dropped.
    signature: str


class ToolUseContent(TypedDict):
    type: Literal["tool_use"]
    #: "toolu_..." (the call's own id when the model or upstream gave one).
    id: str
    name: str
    input: dict[str, Any]


ContentOut = Union[TextContent, ThinkingContent, ToolUseContent]


class Usage(TypedDict):
    #: Prompt tokens not read from a prompt cache.
    input_tokens: int
    output_tokens: int
    #: Always 0: the prompt cache is filled as a side effect, never billed apart.
    cache_creation_input_tokens: int
    #: Prompt tokens served from the prompt cache (the contract's cached_prompt_tokens).
    cache_read_input_tokens: int


class AnthropicMessage(TypedDict):
    """The answer of POST /v1/messages (and the skeleton in ``message_start``)."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[ContentOut]
    model: str
    stop_reason: Optional[StopReason]
    stop_sequence: Optional[str]
    usage: Usage


class MessageTokensCount(TypedDict):
    """The answer of POST /v1/messages/count_tokens."""

    input_tokens: int


class MessageStartEvent(TypedDict):
    type: Literal["message_start"]
    message: AnthropicMessage


class PingEvent(TypedDict):
    type: Literal["ping"]


class ContentBlockStartEvent(TypedDict):
    type: Literal["content_block_start"]
    index: int
    content_block: ContentOut


class TextDelta(TypedDict):
    type: Literal["text_delta"]
    text: str


class ThinkingDelta(TypedDict):
    type: Literal["thinking_delta"]
    thinking: str


class InputJSONDelta(TypedDict):
    type: Literal["input_json_delta"]
    partial_json: str


class SignatureDelta(TypedDict):
    """Read from an upstream (never sent: there is no signature to send)."""

    type: Literal["signature_delta"]
    signature: str


class ContentBlockDeltaEvent(TypedDict):
    type: Literal["content_block_delta"]
    index: int
    delta: Union[TextDelta, ThinkingDelta, InputJSONDelta]


class ContentBlockStopEvent(TypedDict):
    type: Literal["content_block_stop"]
    index: int


class MessageDelta(TypedDict):
    stop_reason: Optional[StopReason]
    stop_sequence: Optional[str]


class MessageDeltaUsage(TypedDict):
    """Cumulative counts at the end (``input_tokens`` is only known then: ``message_start`` says 0)."""

    output_tokens: int
    input_tokens: NotRequired[int]
    cache_creation_input_tokens: NotRequired[int]
    cache_read_input_tokens: NotRequired[int]


class MessageDeltaEvent(TypedDict):
    type: Literal["message_delta"]
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(TypedDict):
    type: Literal["message_stop"]


#: One event of a stream (``event: <type>`` then ``data: <this>``).
StreamEvent = Union[
    MessageStartEvent, PingEvent, ContentBlockStartEvent, ContentBlockDeltaEvent, ContentBlockStopEvent,
    MessageDeltaEvent, MessageStopEvent, Error,
]


#: GET /v1/models (Anthropic): models per page.
MODELS_LIMIT_DEFAULT = 20
MODELS_LIMIT_MAX = 1000


class ListModelsQuery(WireModel):
    """GET /v1/models from an Anthropic client (``anthropic-version`` sent): the query string."""

    limit: Optional[integer(1, MODELS_LIMIT_MAX)] = Field(
        None, description=f"models per page (Anthropic clients), default {MODELS_LIMIT_DEFAULT}")
    after_id: Optional[str] = Field(None, description="a model id: the page starts after it (Anthropic clients)")
    before_id: Optional[str] = Field(None, description="a model id: the page ends before it (Anthropic clients)")

    @model_validator(mode="after")
    def _one_cursor(self) -> "ListModelsQuery":
        if self.after_id is not None and self.before_id is not None:
            raise ValueError("give after_id or before_id, not both")
        return self


class ModelInfo(TypedDict):
    """One model of GET /v1/models: served to Anthropic clients, read from an Anthropic upstream."""

    type: Literal["model"]
    id: str
    display_name: str
    created_at: str


class ModelList(TypedDict):
    data: list[ModelInfo]
    has_more: bool
    first_id: Optional[str]
    last_id: Optional[str]
