"""The OpenAI Responses dialect (``/v1/responses``), declared once.

Requests are ``WireModel``s; responses, stored items and stream events are
``TypedDict``s.  The HTTP front (``gateway/responses/``) parses and renders
with them and ``/openapi.json`` is generated from them.  The shapes follow
OpenAI's API reference and the official ``openai`` SDK's types
(``openai.types.responses``: ``ResponseCreateParams``, ``Response``,
``ResponseStreamEvent``, ``ResponseItem``...).

What is served (README, gateway/README.md "Deviations from OpenAI's Responses
API"): function tools only (hosted tools such as ``web_search`` or
``file_search`` are 400), ``input`` as text or items (messages with
``input_text`` / ``input_image`` (data: URLs) / ``output_text`` parts,
``function_call``, ``function_call_output`` and ``reasoning`` items),
``text.format`` (text, json_object, json_schema), ``reasoning.effort``,
``store`` and ``previous_response_id`` (kept in the front's SQLite store).
Background mode, conversation objects, prompt templates, file inputs and item
references are 400 with a message saying so.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union, get_args

from pydantic import BeforeValidator, ConfigDict, Discriminator, Field, Tag, WithJsonSchema
from typing_extensions import Annotated, NotRequired, TypedDict

from mlxgate import limits
#: Error bodies are OpenAI's (``{"error": {"message", "type", "param", "code"}}``).
from mlxgate.dialects.openai import Error, ErrorDetail  # noqa: F401 - re-exported
from mlxgate.dialects.base import (
    IMAGE_DETAIL_RULE,
    IMAGE_RULES,
    ImageDetail,
    IMAGE_URL_RULE,
    INT32_MAX,
    Limit,
    ModelName,
    ToolName,
    WireModel,
    caller_arguments,
    ignored,
    integer,
    json_type,
)

# ---------------------------------------------------------------- constants

Role = Literal["user", "assistant", "system", "developer"]
#: Message roles -> the contract's roles ("developer" is OpenAI's newer "system").
ROLES: dict[str, str] = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
assert set(ROLES) == set(get_args(Role))

#: ``reasoning.effort``: "none" asks for no thinking, any other level for thinking.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
REASONING_EFFORTS: tuple[str, ...] = get_args(ReasoningEffort)

#: Input item types served, and the ones OpenAI defines that are not (400, with why).
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
UNSUPPORTED_ITEMS: dict[str, str] = {
    "item_reference": "item references are not supported; send the item itself, or use previous_response_id",
}
#: Tool types OpenAI hosts (they run on OpenAI's servers): none of them runs here.
HOSTED_TOOLS = (
    "web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11", "file_search",
    "computer_use_preview", "computer", "code_interpreter", "image_generation", "mcp", "local_shell", "shell",
    "custom", "apply_patch", "tool_search",
)

#: Statuses of a response (``in_progress`` only inside a stream).
Status = Literal["completed", "incomplete", "failed", "in_progress"]
#: The contract's finish reason -> ``incomplete_details.reason`` (absent: the response is complete).
INCOMPLETE_REASON: dict[str, str] = {"length": "max_output_tokens"}

#: Prefixes of the ids this server makes.
RESPONSE_ID_PREFIX = "resp_"
#: Longest id a caller may name (ours are far shorter).
MAX_ID_CHARS = 256
#: ``GET /v1/responses/{id}/input_items``: items per page (OpenAI's 1-100, default 20).
LIST_LIMIT_MAX, LIST_LIMIT_DEFAULT = 100, 20
#: ``metadata``: OpenAI's bounds (16 pairs, keys of 64 characters, values of 512).
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512

_IGNORED = "accepted and ignored"


def refused(json_schema: dict[str, Any], why: str) -> Any:
    """A field OpenAI defines for something not served here: documented with
    the only value accepted (``json_schema``), any other is 400 saying ``why``."""
    return Annotated[Any, WithJsonSchema({**json_schema, "description": why})]


# ---------------------------------------------------------------- content parts


class InputText(WireModel):
    type: Literal["input_text"]
    text: str


class InputImage(WireModel):
    type: Literal["input_image"]
    image_url: Optional[str] = Field(
        None, description=f"a data: URL or bare base64 of {IMAGE_RULES}; {IMAGE_URL_RULE}"
    )
    file_id: Optional[str] = Field(None, description="file inputs are not supported (400)")
    detail: Optional[ImageDetail] = Field(None, description=IMAGE_DETAIL_RULE)


class InputFile(WireModel):
    """OpenAI's file input: not supported (400), documented so the error is clear."""

    type: Literal["input_file"]


class OutputText(WireModel):
    """Assistant text given back as history."""

    type: Literal["output_text"]
    text: str
    annotations: Optional[ignored({"type": "array"})] = None
    logprobs: Optional[ignored({"type": "array"})] = None


class RefusalPart(WireModel):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    Union[InputText, InputImage, InputFile, OutputText, RefusalPart], Field(discriminator="type")
]


# ---------------------------------------------------------------- input items


class MessageItem(WireModel):
    """A message; ``type`` may be left out (OpenAI's "easy" input message)."""

    type: Optional[Literal["message"]] = None
    role: Role
    content: Union[str, list[ContentPart]]
    id: Optional[str] = None
    status: Optional[ignored({"type": "string"})] = None
    phase: Optional[ignored({"type": "string"})] = None


def _arguments_text(v: Any) -> Any:
    """A caller's function-call arguments: JSON text of an object (kept as sent)."""
    if not isinstance(v, str):
        raise ValueError(f"must be a string (JSON text of an object), got {json_type(v)}")
    try:
        caller_arguments(v, "")
    except ValueError as e:  # not an object: "is not valid JSON ...", "must be ..."
        raise ValueError(str(e).strip()) from None
    return v


#: Function-call arguments as a caller sends them: JSON text of an object.
ArgumentsText = Annotated[str, BeforeValidator(_arguments_text)]


class FunctionCallItem(WireModel):
    """A call the model made, given back as history."""

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[ToolName, Field(min_length=1)]
    arguments: ArgumentsText = Field(description="JSON text of an object", examples=["{}"])
    id: Optional[str] = None
    status: Optional[ignored({"type": "string"})] = None


class FunctionCallOutputItem(WireModel):
    """The result of a call, for the model's next turn."""

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: Union[str, list[ContentPart]] = Field(description="text, or input_text parts (images are 400)")
    id: Optional[str] = None
    status: Optional[ignored({"type": "string"})] = None


class SummaryText(WireModel):
    type: Literal["summary_text"]
    text: str


class ReasoningText(WireModel):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(WireModel):
    """Reasoning given back as history: its text (``content``, else ``summary``)
    goes to the next assistant message as ``reasoning_content``."""

    type: Literal["reasoning"]
    summary: list[SummaryText] = Field(default_factory=list)
    content: Optional[list[ReasoningText]] = None
    id: Optional[str] = None
    encrypted_content: Optional[ignored({"type": "string"})] = None
    status: Optional[ignored({"type": "string"})] = None


def _item_tag(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("type") or "message"
    return getattr(v, "type", None) or "message"


def _known_item(v: Any) -> Any:
    """An item of a type this server does not serve is refused with why."""
    if isinstance(v, dict):
        kind = v.get("type")
        if kind is None and "role" not in v and "id" in v:
            kind = "item_reference"
        if isinstance(kind, str) and kind not in ITEM_TYPES:
            why = UNSUPPORTED_ITEMS.get(
                kind, "this server takes message, function_call, function_call_output and reasoning items")
            raise ValueError(f"type {limits.clip_name(kind)!r} is not supported: {why}")
    return v


InputItem = Annotated[
    Union[
        Annotated[MessageItem, Tag("message")],
        Annotated[FunctionCallItem, Tag("function_call")],
        Annotated[FunctionCallOutputItem, Tag("function_call_output")],
        Annotated[ReasoningItem, Tag("reasoning")],
    ],
    Discriminator(_item_tag),
    BeforeValidator(_known_item),
]


# ---------------------------------------------------------------- tools and formats


def _function_tool(v: Any) -> Any:
    if isinstance(v, dict) and isinstance(v.get("type"), str) and v["type"] != "function":
        kind = limits.clip_name(v["type"])
        why = "hosted tools run on OpenAI's servers" if v["type"] in HOSTED_TOOLS else "unknown tool type"
        raise ValueError(f"type {kind!r} is not supported ({why}): this server runs function tools only")
    return v


class FunctionTool(WireModel):
    """A function the model may call (the Responses shape: flat, no ``function`` object)."""

    type: Literal["function"]
    name: Annotated[ToolName, Field(min_length=1)]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="JSON schema of the arguments")
    strict: Optional[ignored({"type": "boolean"})] = None


Tool = Annotated[FunctionTool, BeforeValidator(_function_tool)]


class NamedFunction(WireModel):
    type: Literal["function"]
    name: Annotated[ToolName, Field(min_length=1)]


class AllowedTools(WireModel):
    """Only these tools (``mode`` "auto": may call one; "required": must)."""

    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[NamedFunction]


ToolChoice = Annotated[
    Union[Literal["none", "auto", "required"], Annotated[Union[NamedFunction, AllowedTools],
                                                        Field(discriminator="type")]],
    Field(description='"none" drops the tools; "auto" offers them; "required" forces one call to one of them; '
                      "a named function keeps only it and forces a call to it; allowed_tools keeps those "
                      "(forcing with mode required). Forcing needs an MLX model with a known tool-call format "
                      "(400 otherwise) and no JSON text.format"),
]


class FormatText(WireModel):
    type: Literal["text"]


class FormatJSONObject(WireModel):
    type: Literal["json_object"]


class FormatJSONSchema(WireModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")
    name: Optional[str] = Field(None, description="echoed")
    description: Optional[str] = Field(None, description="echoed")
    strict: Optional[bool] = Field(None, description="echoed; the output always follows the schema (a grammar)")


TextFormat = Annotated[Union[FormatText, FormatJSONObject, FormatJSONSchema], Field(discriminator="type")]


class TextConfig(WireModel):
    format: Optional[TextFormat] = None
    verbosity: Optional[ignored({"type": "string"})] = None


class Reasoning(WireModel):
    effort: Optional[ReasoningEffort] = Field(
        None, description="none: no thinking; any other level: thinking (the level is not honoured); "
                          "absent: the model's default")
    summary: Optional[ignored({"type": "string"})] = None
    generate_summary: Optional[ignored({"type": "string"})] = None


MetadataKey = Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_PAIRS)]

ResponseId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


# ---------------------------------------------------------------- the create request


class CreateRequest(WireModel):
    """POST /v1/responses.  ``input`` is required unless ``previous_response_id`` is given."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["input"]},
                                                           {"required": ["previous_response_id"]}]})

    model: Annotated[ModelName, Field(min_length=1)]
    input: Optional[Union[str, Annotated[list[InputItem], Field(min_length=1),
                                         Limit(maxItems=limits.MAX_MESSAGES)]]] = Field(
        None, description="text (one user message) or items; with previous_response_id, the new items")
    instructions: Optional[str] = Field(
        None, description="a system message first; not carried over by previous_response_id")
    tools: Optional[Annotated[list[Tool], Limit(maxItems=limits.MAX_TOOLS)]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = Field(None, description="echoed (forced calls are always one)")
    text: Optional[TextConfig] = None
    reasoning: Optional[Reasoning] = None
    max_output_tokens: Optional[integer(1, INT32_MAX)] = Field(
        None, description="absent: until a stop or the context is full")
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    top_p: Optional[Annotated[float, Field(ge=0, le=1)]] = Field(None, description="0 means greedy")
    metadata: Optional[Metadata] = None
    store: Optional[bool] = Field(None, description="default true: kept for previous_response_id and GET")
    previous_response_id: Optional[ResponseId] = None
    stream: Optional[bool] = None
    truncation: Optional[Literal["auto", "disabled"]] = Field(
        None, description="auto: drop the oldest messages that do not fit the context (system messages "
                          "stay); disabled (default): 400 when the input does not fit")
    # Not served: 400 when set.
    background: Optional[refused({"const": False}, "no background mode: true is 400")] = None
    conversation: refused({"type": "null"}, "no conversation objects (400): use previous_response_id") = None
    prompt: refused({"type": "null"}, "no prompt templates (400): send instructions and input") = None
    # Without meaning here.
    user: Optional[Any] = Field(None, description=_IGNORED)
    include: Optional[Any] = Field(None, description=_IGNORED)
    service_tier: Optional[Any] = Field(None, description=_IGNORED)
    safety_identifier: Optional[Any] = Field(None, description=_IGNORED)
    prompt_cache_key: Optional[Any] = Field(None, description=_IGNORED)
    prompt_cache_retention: Optional[Any] = Field(None, description=_IGNORED)
    stream_options: Optional[Any] = Field(None, description=_IGNORED)
    top_logprobs: Optional[Any] = Field(None, description=_IGNORED)
    max_tool_calls: Optional[Any] = Field(None, description=_IGNORED)


class ListItemsQuery(WireModel):
    """GET /v1/responses/{response_id}/input_items: the query string."""

    limit: Optional[integer(1, LIST_LIMIT_MAX)] = Field(None, description=f"default {LIST_LIMIT_DEFAULT}")
    order: Optional[Literal["asc", "desc"]] = Field(None, description="default desc (newest first)")
    after: Optional[str] = Field(None, description="an item id: the page starts after it (in this order)")
    before: Optional[str] = Field(None, description="an item id: the page ends before it (in this order)")
    include: Optional[ignored({"type": "string"})] = None


# ---------------------------------------------------------------- response shapes


class OutputTextPart(TypedDict):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class InputTextPart(TypedDict):
    type: Literal["input_text"]
    text: str


class InputImagePart(TypedDict):
    type: Literal["input_image"]
    image_url: str
    detail: str


class RefusalOutPart(TypedDict):
    type: Literal["refusal"]
    refusal: str


class OutputMessage(TypedDict):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[Union[OutputTextPart, RefusalOutPart]]


class FunctionCall(TypedDict):
    id: str
    type: Literal["function_call"]
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    arguments: str


class SummaryPart(TypedDict):
    type: Literal["summary_text"]
    text: str


class ReasoningTextPart(TypedDict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningOut(TypedDict):
    id: str
    type: Literal["reasoning"]
    summary: list[SummaryPart]
    content: list[ReasoningTextPart]
    status: NotRequired[Literal["in_progress", "completed", "incomplete"]]


OutputItem = Union[OutputMessage, FunctionCall, ReasoningOut]


class InputMessage(TypedDict):
    """A stored input message (user, system, developer)."""

    id: str
    type: Literal["message"]
    role: Literal["user", "system", "developer"]
    status: Literal["completed"]
    content: list[Union[InputTextPart, InputImagePart, OutputTextPart, RefusalOutPart]]


class FunctionCallOutput(TypedDict):
    id: str
    type: Literal["function_call_output"]
    status: Literal["completed"]
    call_id: str
    output: Union[str, list[Union[InputTextPart, OutputTextPart]]]


#: What ``input_items`` lists: an input as stored (ids given to every item).
Item = Union[InputMessage, OutputMessage, FunctionCall, FunctionCallOutput, ReasoningOut]


class InputTokensDetails(TypedDict):
    cached_tokens: int
    #: Required by OpenAI's spec (ResponseUsage); always 0 here: the MLX prompt
    #: cache keeps what it computed without a separate, billable write.
    cache_write_tokens: int


class OutputTokensDetails(TypedDict):
    reasoning_tokens: int


class Usage(TypedDict):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(TypedDict):
    code: str
    message: str


class IncompleteDetails(TypedDict):
    reason: str


class FormatOut(TypedDict, total=False):
    type: str
    name: str
    schema: dict[str, Any]
    description: str
    strict: bool


class TextOut(TypedDict):
    format: FormatOut


class ReasoningConfigOut(TypedDict):
    effort: Optional[str]
    summary: Optional[str]


class FunctionToolOut(TypedDict):
    type: Literal["function"]
    name: str
    description: Optional[str]
    parameters: Optional[dict[str, Any]]
    strict: Optional[bool]


class Response(TypedDict):
    id: str
    object: Literal["response"]
    created_at: int
    completed_at: Optional[int]
    status: Status
    error: Optional[ResponseError]
    incomplete_details: Optional[IncompleteDetails]
    model: str
    output: list[OutputItem]
    instructions: Optional[str]
    tools: list[FunctionToolOut]
    tool_choice: Any
    parallel_tool_calls: bool
    text: TextOut
    reasoning: ReasoningConfigOut
    temperature: Optional[float]
    top_p: Optional[float]
    max_output_tokens: Optional[int]
    truncation: Literal["auto", "disabled"]
    previous_response_id: Optional[str]
    store: bool
    metadata: dict[str, str]
    background: bool
    usage: Optional[Usage]


class DeletedResponse(TypedDict):
    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]


class ItemList(TypedDict):
    object: Literal["list"]
    data: list[Item]
    first_id: Optional[str]
    last_id: Optional[str]
    has_more: bool


# ---------------------------------------------------------------- stream events
#
# Each is one SSE event: ``event: <type>`` and ``data: <the object>``, with a
# ``sequence_number`` counting from 0.  The order (gateway/responses/translate.py):
# response.created, response.in_progress, then per output item
# output_item.added, [content_part.added, deltas, *.done, content_part.done],
# output_item.done; then response.completed (or response.incomplete), or, when
# generation failed after the stream began, error and response.failed.


class _Event(TypedDict):
    sequence_number: int


class ResponseEvent(_Event):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    response: Response


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: Union[OutputTextPart, ReasoningTextPart]


class TextDeltaEvent(_Event):
    type: Literal["response.output_text.delta"]
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any]


class TextDoneEvent(_Event):
    type: Literal["response.output_text.done"]
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any]


class ReasoningDeltaEvent(_Event):
    type: Literal["response.reasoning_text.delta"]
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningDoneEvent(_Event):
    type: Literal["response.reasoning_text.done"]
    item_id: str
    output_index: int
    content_index: int
    text: str


class ArgumentsDeltaEvent(_Event):
    type: Literal["response.function_call_arguments.delta"]
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"]
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event):
    type: Literal["error"]
    code: Optional[str]
    message: str
    param: Optional[str]


StreamEvent = Union[
    ResponseEvent, OutputItemEvent, ContentPartEvent, TextDeltaEvent, TextDoneEvent, ReasoningDeltaEvent,
    ReasoningDoneEvent, ArgumentsDeltaEvent, ArgumentsDoneEvent, ErrorEvent,
]
