"""The Ollama REST dialect (Ollama's docs/api.md), declared once.

Requests are ``WireModel``s; responses are ``TypedDict``s.  Both sides use
them: the HTTP front (``gateway/ollama/``) parses requests and renders
answers, the upstream adapter (``backends/ollama/wire.py``) builds requests
and reads answers, and ``/openapi.json`` is generated from them.

Deliberate choices of the front (README, "Deviations from Ollama"):

- ``template`` (a Go template) cannot be honoured: models here carry Jinja
  chat templates, so a non-empty ``template`` without ``raw`` is a 400;
- ``context`` (deprecated) and the options without meaning for MLX are
  accepted, type checked and ignored; unknown options are ignored too;
- ``think``: true or a level (all mean true), false, or absent;
- ``num_predict`` < 0 means no limit (until a stop or the context is full); a negative ``seed``
  a random one;
- the final object of a generation carries an extra ``backend`` field.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union, get_args

from pydantic import AfterValidator, Field
from typing_extensions import Annotated, NotRequired, TypedDict

from mlxgate import limits
from mlxgate.dialects.base import (
    IMAGE_RULES,
    Base64Bytes,
    Int,
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
)
from mlxgate.durations import parse_duration

#: Version reported by GET /api/version: a recent Ollama whose API we follow,
#: so clients that gate features on the server version enable them.
VERSION = "0.12.0"

#: ``think`` levels (newer Ollama); every level means "think" here.
ThinkLevel = Literal["low", "medium", "high"]
THINK_LEVELS: tuple[str, ...] = get_args(ThinkLevel)

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = get_args(Role)

# ---------------------------------------------------------------- options

#: Sampling knob (the contract's SamplingParams field) -> Ollama option name.
#: The one table both directions use (front: options -> proto; adapter:
#: domain sampling -> options).
OPTION_OF_SAMPLING: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_tokens": "num_predict",
    "num_ctx": "num_ctx",
    "typical_p": "typical_p",
}

#: Options Ollama documents that have no meaning for MLX: type checked, ignored.
IGNORED_OPTIONS = (
    "tfs_z", "mirostat_tau", "mirostat_eta",
    "num_keep", "mirostat", "num_batch", "num_gpu", "main_gpu", "num_thread",
    "penalize_newline", "numa", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock",
    "embedding_only",
)

_IGNORED = "accepted and ignored (no meaning for MLX)"

#: The smallest context Ollama runs a model with: a smaller ``num_ctx`` is raised to it.
MIN_NUM_CTX = 4


class OptionTypes(WireModel):
    """Model options (Modelfile parameters and runner options), by type only:
    what the embedding routes accept and ignore."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[Int32] = None
    min_p: Optional[float] = None
    seed: Optional[Int64] = Field(None, description="negative: a random seed")
    repeat_penalty: Optional[float] = None
    repeat_last_n: Optional[Int32] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    num_predict: Optional[Int32] = Field(
        None, description="most tokens to generate; negative: no limit (until a stop or the context is full)"
    )
    num_ctx: Optional[Int32] = None
    typical_p: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None
    # Documented by Ollama, without meaning here.
    tfs_z: Optional[float] = Field(None, description=_IGNORED)
    mirostat_tau: Optional[float] = Field(None, description=_IGNORED)
    mirostat_eta: Optional[float] = Field(None, description=_IGNORED)
    num_keep: Optional[Int] = Field(None, description=_IGNORED)
    mirostat: Optional[Int] = Field(None, description=_IGNORED)
    num_batch: Optional[Int] = Field(None, description=_IGNORED)
    num_gpu: Optional[Int] = Field(None, description=_IGNORED)
    main_gpu: Optional[Int] = Field(None, description=_IGNORED)
    num_thread: Optional[Int] = Field(None, description=_IGNORED)
    penalize_newline: Optional[bool] = Field(None, description=_IGNORED)
    numa: Optional[bool] = Field(None, description=_IGNORED)
    low_vram: Optional[bool] = Field(None, description=_IGNORED)
    f16_kv: Optional[bool] = Field(None, description=_IGNORED)
    logits_all: Optional[bool] = Field(None, description=_IGNORED)
    vocab_only: Optional[bool] = Field(None, description=_IGNORED)
    use_mmap: Optional[bool] = Field(None, description=_IGNORED)
    use_mlock: Optional[bool] = Field(None, description=_IGNORED)
    embedding_only: Optional[bool] = Field(None, description=_IGNORED)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())


class Options(OptionTypes):
    """Model options of a generation: the sampling ones carry the contract's
    ranges (documented here, enforced by the inference service)."""

    temperature: Optional[Annotated[float, contract_range("temperature")]] = None
    top_p: Optional[Annotated[float, contract_range("top_p")]] = Field(None, description="0 means greedy")
    top_k: Optional[Annotated[Int32, contract_range("top_k")]] = None
    min_p: Optional[Annotated[float, contract_range("min_p")]] = None
    repeat_penalty: Optional[Annotated[float, contract_range("repeat_penalty")]] = None
    repeat_last_n: Optional[Annotated[Int32, contract_range("repeat_last_n")]] = None
    presence_penalty: Optional[Annotated[float, contract_range("presence_penalty")]] = None
    frequency_penalty: Optional[Annotated[float, contract_range("frequency_penalty")]] = None
    typical_p: Optional[Annotated[float, contract_range("typical_p")]] = Field(None, description="1 means no filter")
    num_ctx: Optional[Int32] = Field(
        None, description=f"below {MIN_NUM_CTX}: {MIN_NUM_CTX} (Ollama's minimum; the log says so)")
    stop: Optional[Union[StopText, StopList]] = None


# ---------------------------------------------------------------- shared request fields


def keep_alive_seconds(v: Union[float, str]) -> float:
    """Seconds; 0 = unload when done; any negative (or beyond ~290 years) = -1, keep loaded."""
    if isinstance(v, str):
        try:
            secs = parse_duration(v)
        except ValueError:
            raise ValueError(
                f'invalid duration {limits.clip_name(v)!r} (use e.g. "5m", "1h30m", "-1" or seconds)'
            ) from None
    else:
        secs = float(v)
    if math.isnan(secs):
        raise ValueError("must be a duration string or a number of seconds")
    return -1.0 if secs < 0 or secs > limits.KEEP_ALIVE_FOREVER_S else secs


#: Go duration ("5m", "1h30m", "-1s"), or seconds as a number; parsed to seconds.
KeepAlive = Annotated[
    Union[float, str],
    AfterValidator(keep_alive_seconds),
    Field(description='Go duration ("5m", "1h30m"), or seconds; 0 = unload when done, negative = keep loaded'),
]

#: "json", a JSON schema, or "" / absent for free text.
Format = Annotated[
    Union[Literal["json", ""], dict[str, Any]],
    Field(description='"json" or a JSON schema object'),
]

Think = Annotated[
    Union[bool, ThinkLevel],
    Field(description="true or a level (all mean true): reasoning in `thinking`; false: none; "
                      "absent: the model's default"),
]

Images = Annotated[
    list[Base64Bytes], Limit(maxItems=limits.MAX_IMAGES), Field(description=f"base64 images, each {IMAGE_RULES}")
]
TopLogprobs = Annotated[Int32, Limit(minimum=0, maximum=limits.MAX_TOP_LOGPROBS)]


def _arguments(v: Any) -> dict[str, Any]:
    try:
        return caller_arguments(v, "")
    except ValueError as e:
        raise ValueError(str(e).strip()) from None


#: Tool-call arguments: a JSON object (Ollama's shape); JSON text of one is accepted.
Arguments = Annotated[Any, AfterValidator(_arguments), Field(json_schema_extra={"type": "object"})]


class _Common(WireModel):
    """Fields /api/generate and /api/chat share."""

    model: Annotated[ModelName, Field(min_length=1)]
    format: Optional[Format] = None
    options: Optional[Options] = None
    stream: Optional[bool] = Field(None, description="default true: NDJSON lines")
    keep_alive: Optional[KeepAlive] = None
    think: Optional[Think] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[TopLogprobs] = None
    truncate: Optional[bool] = Field(
        None, description="default true: a prompt too long for the context loses its oldest messages "
                          "(or its start); false: 400 instead")


class GenerateRequest(_Common):
    """POST /api/generate."""

    prompt: Optional[str] = Field(None, description="empty or absent: load the model (keep_alive 0: unload)")
    suffix: Optional[str] = None
    system: Optional[str] = None
    template: Optional[str] = Field(None, description="only with raw=true (then ignored); otherwise 400")
    raw: Optional[bool] = None
    images: Optional[Images] = None
    context: Optional[ignored({"type": "array", "items": {"type": "integer"}, "deprecated": True})] = None


class ToolCallFunction(WireModel):
    index: Optional[Int32] = None
    name: Optional[ToolName] = Field(None, description="history: a call without a name is dropped (logged)")
    arguments: Optional[Arguments] = None


class ToolCall(WireModel):
    """A call in an assistant's history: what the model produced earlier, so one that
    cannot be kept (no ``function``, no name) is dropped, not refused, as Ollama takes it."""

    id: Optional[str] = None
    function: Optional[ToolCallFunction] = None


class Message(WireModel):
    role: Role
    content: Optional[str] = None
    images: Optional[Images] = None
    tool_calls: Optional[Annotated[list[ToolCall], Limit(maxItems=limits.MAX_TOOL_CALLS)]] = None
    tool_name: Optional[str] = None
    thinking: Optional[str] = Field(None, description="assistant history: the reasoning before content")


class ChatRequest(_Common):
    """POST /api/chat."""

    messages: Optional[Annotated[list[Message], Limit(maxItems=limits.MAX_MESSAGES)]] = Field(
        None, description="empty or absent: load the model (keep_alive 0: unload)")
    tools: Optional[Annotated[list[Tool], Limit(maxItems=limits.MAX_TOOLS)]] = None
    template: Optional[ignored({"type": "string"})] = None


#: One input or several (a request's inputs are a contract limit).
EmbedInput = Union[str, Annotated[list[str], Limit(maxItems=limits.MAX_EMBED_INPUTS)]]


class EmbedRequest(WireModel):
    """POST /api/embed."""

    model: Annotated[ModelName, Field(min_length=1)]
    input: Optional[EmbedInput] = Field(
        None, description='absent, "" or []: load the model (answers no embeddings, as Ollama)')
    truncate: Optional[bool] = Field(None, description="default true: inputs are cut to the context")
    dimensions: Optional[integer(0, INT32_MAX)] = Field(
        None, description="keep the first N dimensions (re-normalised); 0, absent or at least the model's "
                          "size: the whole vector")
    keep_alive: Optional[KeepAlive] = None
    options: Optional[OptionTypes] = Field(None, description="type checked and ignored: embeddings take no "
                                                               "sampling options")

    def inputs(self) -> list[str]:
        """The texts to embed.  One empty string is no input (Ollama's handler drops it); an
        empty string in a list stays, and is refused by the backend naming it."""
        return ([self.input] if self.input else []) if isinstance(self.input, str) else list(self.input or ())


class EmbeddingsRequest(WireModel):
    """POST /api/embeddings (legacy: one prompt, one vector)."""

    model: Annotated[ModelName, Field(min_length=1)]
    prompt: Optional[str] = None
    keep_alive: Optional[KeepAlive] = None
    options: Optional[OptionTypes] = Field(None, description="type checked and ignored")


class ShowRequest(WireModel):
    """POST /api/show."""

    model: Optional[ModelName] = None
    name: Optional[ModelName] = Field(
        None, description="deprecated: use model", json_schema_extra={"deprecated": True})
    verbose: Optional[ignored({"type": "boolean"})] = None
    system: Optional[Any] = Field(None, description="accepted and ignored")
    template: Optional[Any] = Field(None, description="accepted and ignored")
    options: Optional[Any] = Field(None, description="accepted and ignored")


class PullRequest(WireModel):
    """POST /api/pull."""

    model: Optional[ModelName] = Field(
        None, description="a catalog name (llama3.2:1b), hf.co/<owner>/<repo>[:<revision>] or "
                          "<owner>/<repo>[:<revision>]; listed under this name")
    name: Optional[ModelName] = Field(
        None, description="deprecated: use model", json_schema_extra={"deprecated": True})
    insecure: Optional[ignored({"type": "boolean"})] = None
    stream: Optional[bool] = Field(None, description="default true: NDJSON progress lines")


# ---------------------------------------------------------------- responses

#: The contract's finish reason -> Ollama ``done_reason`` (front) ...
DONE_REASON: dict[str, str] = {"stop": "stop", "length": "length", "tool_calls": "stop", "cancelled": "stop"}
#: ... and Ollama's ``done_reason`` -> the contract's finish reason (adapter).
FINISH_OF_DONE_REASON: dict[str, str] = {"stop": "stop", "length": "length", "load": "stop", "unload": "stop"}

DoneReason = Literal["stop", "length", "load", "unload"]


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class Logprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ResponseToolCallFunction(TypedDict):
    index: int
    name: str
    arguments: dict[str, Any]


class ResponseToolCall(TypedDict):
    id: NotRequired[str]
    function: ResponseToolCallFunction


class ResponseMessage(TypedDict):
    role: Literal["assistant"]
    content: str
    thinking: NotRequired[str]
    tool_calls: NotRequired[list[ResponseToolCall]]


class _Final(TypedDict):
    """The fields of the last object of a generation (durations in nanoseconds)."""

    done_reason: NotRequired[DoneReason]
    total_duration: NotRequired[int]
    load_duration: NotRequired[int]
    prompt_eval_count: NotRequired[int]
    prompt_eval_duration: NotRequired[int]
    eval_count: NotRequired[int]
    eval_duration: NotRequired[int]
    logprobs: NotRequired[list[Logprob]]
    #: mlxgate's extension: the backend that answered (final object only).
    backend: NotRequired[str]


class GenerateResponse(_Final):
    """/api/generate: the whole answer, or one NDJSON line of a stream."""

    model: str
    created_at: str
    response: str
    thinking: NotRequired[str]
    done: bool


class ChatResponse(_Final):
    """/api/chat: the whole answer, or one NDJSON line of a stream."""

    model: str
    created_at: str
    message: ResponseMessage
    done: bool


class Error(TypedDict):
    """Every error body, and the last line of a stream that failed."""

    error: str


class EmbedResponse(TypedDict):
    model: str
    embeddings: list[list[float]]
    total_duration: NotRequired[int]
    load_duration: NotRequired[int]
    prompt_eval_count: NotRequired[int]


class EmbeddingsResponse(TypedDict):
    embedding: list[float]


class Details(TypedDict):
    parent_model: str
    format: str
    family: str
    families: Optional[list[str]]
    parameter_size: str
    quantization_level: str


class ListedModel(TypedDict):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details
    backend: str


class TagsResponse(TypedDict):
    models: list[ListedModel]


class ShowResponse(TypedDict):
    license: str
    modelfile: str
    parameters: str
    template: str
    #: A created model's system message and leading messages.
    system: NotRequired[str]
    messages: NotRequired[list[dict[str, str]]]
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str
    backend: str


class RunningModel(TypedDict):
    name: str
    model: str
    size: int
    digest: str
    details: Details
    expires_at: str
    size_vram: int
    context_length: int
    backend: str


class PsResponse(TypedDict):
    models: list[RunningModel]


class ProgressResponse(TypedDict):
    """/api/pull: one NDJSON progress line, or the one answer of stream=false ({"status": "success"})."""

    status: str
    digest: NotRequired[str]
    total: NotRequired[int]
    completed: NotRequired[int]


class VersionResponse(TypedDict):
    version: str
