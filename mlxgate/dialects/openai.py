"""The OpenAI REST dialect (chat completions, completions, embeddings,
models), declared once.

Requests are ``WireModel``s; responses are ``TypedDict``s.  Both sides use
them: the HTTP front (``gateway/openai/``) parses requests and renders
answers, the cloud adapter (``backends/cloud/wire.py``) builds requests to
OpenAI-compatible APIs and reads their answers, and ``/openapi.json`` is
generated from them.

Deliberate choices of the front (README, "Deviations from OpenAI"):
``tool_choice`` "none" drops the tools and a named function keeps only it;
``n`` > 1 runs n generations (``seed + i`` for choice i); ``/v1/completions``
sends prompts raw; ``echo`` and ``best_of`` != n are 400; token-array inputs
are 400; ``top_k``, ``min_p`` and ``repeat_penalty`` are accepted as
extensions; reasoning comes back as ``reasoning_content``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union, get_args

from pydantic import BeforeValidator, Field, PlainSerializer, WithJsonSchema
from typing_extensions import Annotated, NotRequired, TypedDict

from mlxgate import jsonutil, limits
from mlxgate.dialects.base import (
    IMAGE_DETAIL_RULE,
    IMAGE_RULES,
    ImageDetail,
    IMAGE_URL_RULE,
    INT32_MAX,
    Int32,
    Int64,
    Limit,
    ModelName,
    StopList,
    StopText,
    Tool,
    ToolName,
    WireModel,
    caller_arguments,
    contract_range,
    ignored,
    integer,
    json_type,
)

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
#: Chat roles -> the contract's roles ("developer" is OpenAI's newer "system"; "function" its
#: deprecated tool result, which older clients still replay from their history).
ROLES: dict[str, str] = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
    "function": "tool",
}
assert set(ROLES) == set(get_args(Role))

#: ``reasoning_effort`` values: "none" asks for no thinking, any other for thinking.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]
REASONING_EFFORTS: tuple[str, ...] = get_args(ReasoningEffort)

#: Fields OpenAI defines that have no meaning here: accepted and ignored.
IGNORED_FIELDS = (
    "user", "logit_bias", "store", "metadata", "parallel_tool_calls", "service_tier", "modalities", "audio",
    "prediction", "verbosity", "web_search_options", "prompt_cache_key", "safety_identifier", "functions",
    "function_call",
)

#: The contract's finish reason -> OpenAI ``finish_reason`` (front) ...
FINISH_REASON: dict[str, str] = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}
#: ... and an upstream's ``finish_reason`` -> the contract's (cloud adapter).
FINISH_OF_UPSTREAM: dict[str, str] = {
    "stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls",
    "content_filter": "stop",
}

_IGNORED = "accepted and ignored"


def _texts(v: Any) -> Any:
    """A string or a non-empty array of strings; token arrays get their own message."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(s, str) for s in v):
        return v
    if isinstance(v, list) and v and all(isinstance(s, (int, list)) and not isinstance(s, bool) for s in v):
        raise ValueError("token arrays are not supported; send text")
    raise ValueError(f"must be a string or a non-empty array of strings, got {json_type(v)}")


#: Text inputs: one string or several (token arrays are refused).
Texts = Annotated[Union[str, list[str]], BeforeValidator(_texts)]


def texts(v: Union[str, list[str]]) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def _is_token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(v: Any, name: str) -> list[int]:
    if not isinstance(v, list) or not v or not all(_is_token_id(t) for t in v):
        raise ValueError(f"{name} must be a non-empty array of token ids (integers)")
    bad = next((t for t in v if not 0 <= t <= INT32_MAX), None)
    if bad is not None:
        raise ValueError(f"{name}: token ids are integers from 0 to {INT32_MAX}, got {bad}")
    return v


def _embedding_input(v: Any) -> Any:
    """OpenAI's ``input``: a string, an array of strings, an array of token ids
    (one input) or an array of such arrays — one kind only.  Whether the ids
    fit the model is the backend's to say."""
    if isinstance(v, str):
        return v
    if not isinstance(v, list) or not v:
        raise ValueError(
            "must be a string, or a non-empty array of strings, of token ids or of arrays of token ids, "
            f"got {json_type(v)}"
        )
    if all(isinstance(t, str) for t in v):
        return v
    if all(_is_token_id(t) for t in v):
        return _token_ids(v, "input")
    if all(isinstance(t, list) for t in v):
        return [_token_ids(t, f"input[{i}]") for i, t in enumerate(v)]
    raise ValueError("an array holds strings, token ids or arrays of token ids, one kind only")


#: One token id, and one input given as token ids (non-empty).
TokenId = integer(0, INT32_MAX)
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
#: Embedding inputs: texts or token ids (the model's own: MLX models only).
EmbeddingInput = Annotated[
    Union[str, Annotated[list[str], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]],
    BeforeValidator(_embedding_input),
]


def embedding_inputs(v: Union[str, list[str], list[int], list[list[int]]]) -> tuple[list[str], list[list[int]]]:
    """(texts, token-id inputs) of a parsed ``input``."""
    if isinstance(v, str):
        return [v], []
    if v and isinstance(v[0], str):
        return list(v), []  # type: ignore[arg-type]
    if v and isinstance(v[0], int):
        return [], [list(v)]  # type: ignore[arg-type]
    return [], [list(ids) for ids in v]  # type: ignore[union-attr]


# ---------------------------------------------------------------- chat request parts


class ImageURL(WireModel):
    url: str = Field(description=f"a data: URL (base64) of {IMAGE_RULES}; {IMAGE_URL_RULE}")
    detail: Optional[ImageDetail] = Field(None, description=IMAGE_DETAIL_RULE)


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ImagePart(WireModel):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class RefusalPart(WireModel):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[Union[TextPart, ImagePart, RefusalPart], Field(discriminator="type")]


def _arguments(v: Any) -> dict[str, Any]:
    try:
        return caller_arguments(v, "")
    except ValueError as e:
        raise ValueError(str(e).strip()) from None


#: Tool-call arguments: JSON text of an object on the wire (an object is accepted too).
Arguments = Annotated[
    Any,
    BeforeValidator(_arguments),
    PlainSerializer(jsonutil.dumps, return_type=str),
    WithJsonSchema({"type": "string", "description": "JSON text of an object"}),
]


class ToolCallFunction(WireModel):
    name: Annotated[ToolName, Field(min_length=1)]
    arguments: Optional[Arguments] = None


class ToolCall(WireModel):
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: ToolCallFunction


class FunctionCall(WireModel):
    """An assistant's deprecated ``function_call`` (history): what the model produced, so
    its arguments are kept whatever they are (``produced_arguments``)."""

    name: str
    arguments: Optional[Any] = None


class ChatMessage(WireModel):
    role: Role
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[Any] = Field(
        None, description='role "function": the function whose result this is; otherwise accepted and ignored',
        json_schema_extra={"type": "string"})
    tool_calls: Optional[Annotated[list[ToolCall], Limit(maxItems=limits.MAX_TOOL_CALLS)]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = Field(
        None, description="assistant history: the reasoning before content (DeepSeek's and vLLM's convention)")
    refusal: Optional[Any] = Field(None, description=_IGNORED)
    audio: Optional[Any] = Field(None, description=_IGNORED)
    function_call: Optional[Any] = Field(
        None, description="deprecated: an assistant's {name, arguments} is its tool call; anything else is ignored")

    def function_result_name(self) -> str:
        """The function a ``role: "function"`` message answers (its ``name``)."""
        return self.name if self.role == "function" and isinstance(self.name, str) else ""

    def legacy_call(self) -> Optional[FunctionCall]:
        """An assistant's deprecated ``function_call``, when it names a function."""
        if self.role != "assistant" or not isinstance(self.function_call, dict):
            return None
        try:
            call = FunctionCall.model_validate(self.function_call)
        except ValueError:
            return None
        return call if call.name else None


class NamedFunction(WireModel):
    name: Annotated[ToolName, Field(min_length=1)]


class ToolChoiceFunction(WireModel):
    type: Optional[Literal["function"]] = None
    function: NamedFunction


ToolChoice = Annotated[
    Union[Literal["none", "auto", "required"], ToolChoiceFunction],
    Field(description='"none" drops the tools; "auto" offers them; "required" forces one call to one of them; '
                      "a named function keeps only it and forces a call to it (the MLX engine forces calls for "
                      "json_tools models; 400 otherwise, and with a JSON response_format)"),
]


class JSONSchemaFormat(WireModel):
    name: Optional[ignored({"type": "string"})] = None
    description: Optional[ignored({"type": "string"})] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[ignored({"type": "boolean"})] = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class StreamOptions(WireModel):
    include_usage: Optional[bool] = None


class _Sampling(WireModel):
    """Fields chat and text completions share.

    OpenAI's own ranges (temperature 0-2, top_p 0-1, penalties -2..2, n) are
    wire rules of this dialect; the extensions' ranges and the counts are the
    contract's (documented here, enforced by the inference service)."""

    model: Annotated[ModelName, Field(min_length=1)]
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = None
    top_p: Optional[Annotated[float, Field(ge=0, le=1)]] = Field(None, description="0 means greedy")
    presence_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    frequency_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    seed: Optional[Int64] = None
    stop: Optional[Union[StopText, StopList]] = None
    n: Optional[integer(1, limits.MAX_CHOICES)] = Field(
        None, description=f"generations (with several prompts: prompts × n at most {limits.MAX_CHOICES})")
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[integer(1, INT32_MAX)] = None
    top_k: Optional[Annotated[Int32, contract_range("top_k")]] = Field(None, description="extension")
    min_p: Optional[Annotated[float, contract_range("min_p")]] = Field(None, description="extension")
    repeat_penalty: Optional[Annotated[float, contract_range("repeat_penalty")]] = Field(None, description="extension")
    # Without meaning here.
    user: Optional[Any] = Field(None, description=_IGNORED)
    logit_bias: Optional[Any] = Field(None, description=_IGNORED)
    store: Optional[Any] = Field(None, description=_IGNORED)
    metadata: Optional[Any] = Field(None, description=_IGNORED)
    parallel_tool_calls: Optional[Any] = Field(None, description=_IGNORED)
    service_tier: Optional[Any] = Field(None, description=_IGNORED)
    modalities: Optional[Any] = Field(None, description=_IGNORED)
    audio: Optional[Any] = Field(None, description=_IGNORED)
    prediction: Optional[Any] = Field(None, description=_IGNORED)
    verbosity: Optional[Any] = Field(None, description=_IGNORED)
    web_search_options: Optional[Any] = Field(None, description=_IGNORED)
    prompt_cache_key: Optional[Any] = Field(None, description=_IGNORED)
    safety_identifier: Optional[Any] = Field(None, description=_IGNORED)
    functions: Optional[Any] = Field(None, description=_IGNORED)
    function_call: Optional[Any] = Field(None, description=_IGNORED)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1), Limit(maxItems=limits.MAX_MESSAGES)]
    tools: Optional[Annotated[list[Tool], Limit(maxItems=limits.MAX_TOOLS)]] = None
    tool_choice: Optional[ToolChoice] = None
    response_format: Optional[ResponseFormat] = None
    max_completion_tokens: Optional[integer(1, INT32_MAX)] = Field(None, description="wins over max_tokens")
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Annotated[Int32, Limit(minimum=0, maximum=limits.MAX_TOP_LOGPROBS)]] = None
    reasoning_effort: Optional[ReasoningEffort] = Field(
        None, description="none: no thinking; any other level: thinking (the level is not honoured); "
                          "absent: the model's default")


class CompletionRequest(_Sampling):
    """POST /v1/completions (legacy): prompts are sent raw, with no chat template."""

    prompt: Optional[Annotated[Texts, Limit(maxItems=limits.MAX_CHOICES)]] = Field(
        description='text only; token arrays are 400; null is the empty prompt "" (OpenAI\'s default is its '
                    "document separator, which other tokenizers do not have): nothing to continue, an empty "
                    "completion")
    suffix: Optional[str] = None
    logprobs: Optional[integer(0, 5)] = None
    echo: Optional[bool] = Field(None, description="true is 400 (not supported)")
    best_of: Optional[integer(1, INT32_MAX)] = Field(None, description="only equal to n")


class EmbeddingsRequest(WireModel):
    """POST /v1/embeddings."""

    model: Annotated[ModelName, Field(min_length=1)]
    input: Annotated[EmbeddingInput, Limit(maxItems=limits.MAX_EMBED_INPUTS)] = Field(
        description="text, or token ids (the model's own tokenizer's; MLX models only, 400 elsewhere)")
    encoding_format: Optional[Literal["float", "base64"]] = None
    dimensions: Optional[integer(1, INT32_MAX)] = None
    user: Optional[Any] = Field(None, description=_IGNORED)


# ---------------------------------------------------------------- responses


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class Error(TypedDict):
    """Every error body, and the last event of a stream that failed."""

    error: ErrorDetail


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(TypedDict):
    content: list[TokenLogprob]
    refusal: None


class CompletionLogprobs(TypedDict):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ResponseFunction(TypedDict):
    name: str
    arguments: str


class ResponseToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: ResponseFunction


class DeltaToolCall(ResponseToolCall):
    index: int


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: Optional[str]
    refusal: None
    reasoning_content: NotRequired[str]
    tool_calls: NotRequired[list[ResponseToolCall]]


class Delta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str
    reasoning_content: str
    tool_calls: list[DeltaToolCall]


FinishReason = Literal["stop", "length", "tool_calls"]


class CachedTokens(TypedDict):
    cached_tokens: int


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: Optional[ChoiceLogprobs]


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str


class ChunkChoice(TypedDict):
    index: int
    delta: Delta
    logprobs: Optional[ChoiceLogprobs]
    finish_reason: Optional[FinishReason]


class ChatCompletionChunk(TypedDict):
    """One ``data:`` event of a chat stream."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    #: With ``stream_options.include_usage``: null on every chunk but the last (empty choices).
    usage: NotRequired[Optional[Usage]]
    #: mlxgate's extension, on a choice's finishing chunk: the backend that answered.
    backend: NotRequired[str]


class CompletionChoice(TypedDict):
    index: int
    text: str
    finish_reason: Optional[FinishReason]
    logprobs: Optional[CompletionLogprobs]


class Completion(TypedDict):
    """The whole answer of /v1/completions, or one ``data:`` event of its stream."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: NotRequired[Optional[Usage]]
    backend: NotRequired[str]


class Embedding(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]


class EmbeddingsUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(TypedDict):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class Model(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[Model]
