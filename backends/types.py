"""Domain types every backend speaks; their proto forms come from ``backends/pbconvert.py``.

Backends never see protobuf messages: the inference service accepts a
request (``backends/accept.py``: checked and converted in one pass) and
converts each event or result a backend returns with ``to_pb``.  The remote
backend (``backends/remote``), a client of another mlxgate service, reads
events and results with ``from_pb``; ``X.from_pb(x.to_pb()) == x``
(tests/test_types_roundtrip.py).  Fields are named as in the proto, so the
conversion is generic; the ``@proto`` line above each type names what
differs (renames, codecs: the table below).  The HTTP front builds and
reads proto messages itself (``gateway/*/translate.py``), so these types stay
inside the service.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Optional, Union, get_args

from backends.errors import InvalidArgument
from backends.pbconvert import Codec, enum_codec, proto
from backends.proto_values import (
    CAPABILITY_OF_PB,
    CAPABILITY_TO_PB,
    DETAIL_OF_PB,
    DETAIL_TO_PB,
    FINISH_TO_PB,
    ROLE_TO_PB,
    caller_json_object,
    keep_alive_to_pb,
    normalize_keep_alive,
    timestamp_to_pb,
)
from mlxgate.dialects.base import produced_arguments
from mlxgate.jsonutil import JSONError, loads_object
from mlxgate.v1 import inference_pb2 as pb

# ---------------------------------------------------------------- words and values (proto_values.py)

FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)


# ---------------------------------------------------------------- proto forms that differ (pbconvert)

_ROLE = enum_codec(ROLE_TO_PB, lambda n: _no_role())
_DETAILS = Codec(lambda ds: [DETAIL_TO_PB[d] for d in ds], lambda ns: [DETAIL_OF_PB.get(n, "auto") for n in ns])
_FINISH = enum_codec(FINISH_TO_PB, lambda n: "stop")
_CAPABILITIES = Codec(lambda caps: [CAPABILITY_TO_PB[c] for c in caps if c in CAPABILITY_TO_PB],
                      lambda ns: [CAPABILITY_OF_PB[n] for n in ns if n in CAPABILITY_OF_PB])
_FORMAT_TYPE = enum_codec({"text": pb.FORMAT_TYPE_UNSPECIFIED, "json": pb.FORMAT_TYPE_JSON,
                           "json_schema": pb.FORMAT_TYPE_JSON_SCHEMA}, lambda n: "text")
_SCHEMA = Codec(lambda schema: "" if schema is None else json.dumps(schema, ensure_ascii=False),
                lambda text: caller_json_object(text, "format.json_schema") if text else None)
_TOOL_CHOICE = enum_codec({"auto": pb.TOOL_CHOICE_UNSPECIFIED, "required": pb.TOOL_CHOICE_REQUIRED,
                           "function": pb.TOOL_CHOICE_FUNCTION}, lambda n: "auto")
_KEEP_ALIVE = Codec(lambda s: keep_alive_to_pb(s), lambda d: normalize_keep_alive(d.seconds + d.nanos / 1e9))
_TIMESTAMP = Codec(lambda dt: timestamp_to_pb(dt), lambda t: t.ToDatetime(tzinfo=timezone.utc))
_CALLER_ARGUMENTS = Codec(lambda a: json.dumps(a, ensure_ascii=False),
                          lambda text: caller_json_object(text, "tool_calls.arguments_json"))
_PARAMETERS = Codec(lambda p: json.dumps(p, ensure_ascii=False) if p else "",
                    lambda text: caller_json_object(text, "tools.parameters_json"))
_PRODUCED_CALLS = Codec(lambda calls: [c.to_pb() for c in calls],
                        lambda ms: [ToolCall.produced_from_pb(m) for m in ms])
_TOKEN_LISTS = Codec(lambda lists: [pb.TokenIds(ids=ids) for ids in lists], lambda ms: [list(t.ids) for t in ms])
_EMBEDDINGS = Codec(lambda vs: [pb.Embedding(values=v) for v in vs], lambda ms: [list(e.values) for e in ms])
_RANKED = Codec(lambda pairs: [pb.RerankResult(index=i, relevance_score=s) for i, s in pairs],
                lambda ms: [(r.index, r.relevance_score) for r in ms])


def _no_role() -> str:
    raise InvalidArgument("messages: every message needs a role (system, user, assistant or tool)")


def _config(text: str) -> dict:
    """A model's config as another service sent it: broken JSON is no config, not a failure."""
    try:
        return loads_object(text, "config_json") if text else {}
    except JSONError:
        return {}


_CONFIG = Codec(lambda config: json.dumps(config), _config)


# ---------------------------------------------------------------- request


@proto(pb.ToolCall, renames={"arguments": "arguments_json"}, codecs={"arguments": _CALLER_ARGUMENTS})
@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""
    index: int = 0

    @classmethod
    def produced_from_pb(cls, m: pb.ToolCall) -> "ToolCall":
        """A call a model *produced* (an answer from another service): kept
        whatever its arguments are (``produced_arguments``)."""
        return cls(name=m.name, arguments=produced_arguments(m.arguments_json), id=m.id, index=m.index)


@proto(pb.ChatMessage, codecs={"role": _ROLE, "image_details": _DETAILS})
@dataclass
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[bytes] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_name: str = ""
    tool_call_id: str = ""
    #: Assistant history: the reasoning before ``content``.
    thinking: str = ""
    #: Empty, or "low" / "high" / "auto" per image (the accept step checks the count).
    image_details: list[str] = field(default_factory=list)

    def details(self) -> list[str]:
        """Each image's detail ("auto" where none was given)."""
        if len(self.image_details) != len(self.images):
            return ["auto"] * len(self.images)
        return list(self.image_details)

    def to_template_dict(self) -> dict:
        """The shape Hugging Face chat templates expect."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = [
                {
                    "id": t.id or f"call_{i}",
                    "type": "function",
                    "function": {"name": t.name, "arguments": t.arguments},
                }
                for i, t in enumerate(self.tool_calls)
            ]
        if self.tool_name:
            d["name"] = self.tool_name
        if self.tool_call_id:
            d["tool_call_id"] = self.tool_call_id
        if self.thinking:
            # The name Qwen3-style templates read; others ignore it.
            d["reasoning_content"] = self.thinking
        return d


@proto(pb.PromptInput)
@dataclass
class Prompt:
    prompt: str
    suffix: str = ""
    system: str = ""
    raw: bool = False
    images: list[bytes] = field(default_factory=list)





@proto(pb.Tool, renames={"parameters": "parameters_json"}, codecs={"parameters": _PARAMETERS})
@dataclass
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)

    def to_template_dict(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@proto(pb.SamplingParams)
@dataclass
class Sampling:
    """Sampling knobs; None means the backend's default."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    repeat_penalty: Optional[float] = None
    repeat_last_n: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    max_tokens: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    num_ctx: Optional[int] = None
    typical_p: Optional[float] = None





@proto(pb.OutputFormat, renames={"kind": "type", "schema": "json_schema"},
       codecs={"kind": _FORMAT_TYPE, "schema": _SCHEMA})
@dataclass
class OutputFormat:
    kind: Literal["text", "json", "json_schema"] = "text"
    schema: Optional[dict] = None





@proto(pb.ToolChoice, codecs={"mode": _TOOL_CHOICE})
@dataclass
class ToolChoice:
    """Must the model call a tool?  "auto": it may; "required": one of the
    tools; "function": the tool named ``function_name``."""

    mode: Literal["auto", "required", "function"] = "auto"
    function_name: str = ""

    @property
    def forced(self) -> bool:
        return self.mode != "auto"

    def describe(self) -> str:
        return f"function {self.function_name!r}" if self.mode == "function" else repr(self.mode)

    def check(self, tools: list[Tool]) -> None:
        """A forced choice needs tools, and a named function must be one of them."""
        if not self.forced:
            return
        if not tools:
            raise InvalidArgument(f"tool_choice {self.describe()} needs tools")
        if self.mode == "function":
            if not self.function_name:
                raise InvalidArgument("tool_choice: function_name is required")
            if self.function_name not in {t.name for t in tools}:
                raise InvalidArgument(f"tool_choice names {self.function_name!r}, which is not in tools")





@proto(pb.GenerateRequest, renames={"messages": "chat.messages"}, codecs={"keep_alive": _KEEP_ALIVE},
       check=lambda r: r.tool_choice.check(r.tools))
@dataclass
class GenerateRequest:
    """One generation: exactly one of ``prompt`` and ``messages`` is set."""

    model: str
    prompt: Optional[Prompt] = None
    messages: Optional[list[Message]] = None
    tools: list[Tool] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    format: OutputFormat = field(default_factory=OutputFormat)
    logprobs: bool = False
    top_logprobs: int = 0
    keep_alive: Optional[float] = None  # seconds; see keep_alive_from_pb
    #: None = the model's default; True = think; False = no thinking.
    think: Optional[bool] = None
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Context overflow: False = error; True = drop the oldest messages (or
    #: the start of the prompt) to fit, as Ollama does.
    truncate: bool = False
    #: The message this request was accepted from (``backends/accept.py``), so
    #: a remote service gets it as it came (``backends/remote``).  Routing
    #: sets ``model`` anew; any other change drops it (``accepted=None``).
    accepted: Optional[pb.GenerateRequest] = field(default=None, compare=False, repr=False,
                                                   metadata={"proto": False})





# ---------------------------------------------------------------- events


@proto(pb.TopLogprob)
@dataclass
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@proto(pb.TokenLogprob, renames={"top": "top_logprobs"})
@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)




@proto(pb.Chunk, codecs={"tool_calls": _PRODUCED_CALLS}, envelope=(pb.GenerateResponse, "chunk"))
@dataclass
class Chunk:
    """A piece of the answer as it is produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: Set by the router on the first chunk: who is answering.
    backend: str = ""
    model: str = ""
    #: Reasoning text (delta), apart from ``text``.
    thinking: str = ""

    @staticmethod
    def merged(chunks: list["Chunk"]) -> "Chunk":
        """Several chunks as one, in order: what a reader that fell behind (or an
        upstream that sent many tokens in one write) gets in one message."""
        if len(chunks) == 1:
            return chunks[0]
        first = chunks[0]
        return Chunk(
            text="".join(c.text for c in chunks),
            token_ids=[t for c in chunks for t in c.token_ids],
            tool_calls=[t for c in chunks for t in c.tool_calls],
            logprobs=[lp for c in chunks for lp in c.logprobs],
            backend=first.backend,
            model=first.model,
            thinking="".join(c.thinking for c in chunks),
        )



@proto(pb.Done, codecs={"finish_reason": _FINISH}, envelope=(pb.GenerateResponse, "done"))
@dataclass
class Done:
    """The last event of every generation."""

    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    load_duration_ns: int = 0
    prompt_eval_duration_ns: int = 0
    eval_duration_ns: int = 0
    total_duration_ns: int = 0
    backend: str = ""
    model: str = ""
    error_message: str = ""
    #: The stop sequence that ended the generation, when one did and the backend can tell.
    stop_sequence: str = ""




def event_from_pb(m: pb.GenerateResponse) -> Optional["Event"]:
    """A streamed response as a Chunk or Done (None: neither is set)."""
    which = m.WhichOneof("event")
    if which == "chunk":
        return Chunk.from_pb(m.chunk)
    if which == "done":
        return Done.from_pb(m.done)
    return None


Event = Union[Chunk, Done]


@proto(pb.CountTokensResponse)
@dataclass
class TokenCount:
    """What ``Backend.count_tokens`` answers: the prompt tokens of a request's input."""

    input_tokens: int
    backend: str = ""
    model: str = ""




# ---------------------------------------------------------------- embeddings


@proto(pb.EmbedRequest, renames={"inputs": "input"}, codecs={"input_tokens": _TOKEN_LISTS, "keep_alive": _KEEP_ALIVE})
@dataclass
class EmbedRequest:
    """Texts (``inputs``) or token ids (``input_tokens``) to embed, never both.

    Token ids are the model's own (OpenAI's token-array input): only a
    backend running the model itself can take them (``Backend.takes_token_ids``).
    """

    model: str
    inputs: list[str] = field(default_factory=list)
    truncate: bool = True
    dimensions: int = 0
    keep_alive: Optional[float] = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    input_tokens: list[list[int]] = field(default_factory=list)
    #: The message this request was accepted from (as ``GenerateRequest.accepted``).
    accepted: Optional[pb.EmbedRequest] = field(default=None, compare=False, repr=False, metadata={"proto": False})





@proto(pb.EmbedResponse, codecs={"embeddings": _EMBEDDINGS})
@dataclass
class EmbedResult:
    embeddings: list[list[float]]
    prompt_tokens: int = 0
    model: str = ""
    backend: str = ""
    load_duration_ns: int = 0
    total_duration_ns: int = 0




# ---------------------------------------------------------------- models


@proto(pb.ModelDetails)
@dataclass
class ModelDetails:
    family: str = ""
    families: list[str] = field(default_factory=list)
    parameter_count: int = 0
    parameter_size: str = ""
    quantization_level: str = ""
    format: str = ""




@proto(pb.ModelInfo, codecs={"modified_at": _TIMESTAMP})
@dataclass
class ModelInfo:
    name: str
    backend: str
    size_bytes: int = 0
    digest: str = ""
    modified_at: Optional[datetime] = None
    details: ModelDetails = field(default_factory=ModelDetails)
    fallbacks: list[str] = field(default_factory=list)




@proto(pb.ShowModelResponse, renames={"info": "model", "config": "config_json"},
       codecs={"capabilities": _CAPABILITIES, "config": _CONFIG})
@dataclass
class ModelShow:
    info: ModelInfo
    chat_template: str = ""
    context_length: int = 0
    capabilities: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    license: str = ""
    #: A managed model's own settings (``backends.models``).
    system: str = ""
    parameters: Sampling = field(default_factory=Sampling)
    messages: list[Message] = field(default_factory=list)
    parent_model: str = ""




@proto(pb.RunningModel, codecs={"expires_at": _TIMESTAMP})
@dataclass
class RunningModel:
    name: str
    backend: str
    size_bytes: int = 0
    expires_at: Optional[datetime] = None  # None: kept loaded with no expiry
    context_length: int = 0
    details: ModelDetails = field(default_factory=ModelDetails)




@proto(pb.LoadModelResponse)
@dataclass
class LoadResult:
    model: str
    backend: str
    load_duration_ns: int = 0




# ---------------------------------------------------------------- rerank, tokenize, detokenize


@proto(pb.RerankRequest, codecs={"keep_alive": _KEEP_ALIVE})
@dataclass
class RerankRequest:
    """Documents to order by relevance to ``query`` (``Backend.rerank``)."""

    model: str
    query: str
    documents: list[str]
    #: Results to return, best first; 0 = all.
    top_n: int = 0
    #: The judging prompt's task line (causal models); "" = the default.
    instruction: str = ""
    keep_alive: Optional[float] = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)




@proto(pb.RerankResponse, renames={"ranked": "results"}, codecs={"ranked": _RANKED})
@dataclass
class RerankResult:
    """Scores by document, best first: ``ranked`` holds (index, score) pairs."""

    ranked: list[tuple[int, float]]
    total_tokens: int = 0
    model: str = ""
    backend: str = ""
    method: str = ""




def rank(scores: list[float], top_n: int) -> list[tuple[int, float]]:
    """(index, score) pairs, highest score first, equal scores in the
    documents' order; the first ``top_n`` (0: all)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable
    if top_n > 0:
        order = order[:top_n]
    return [(i, scores[i]) for i in order]


@proto(pb.TokenizeRequest, renames={"messages": "chat.messages"}, codecs={"keep_alive": _KEEP_ALIVE})
@dataclass
class TokenizeRequest:
    """A text, or a chat (``messages``, with ``tools`` and ``think``) to render as Generate would."""

    model: str
    text: Optional[str] = None
    messages: Optional[list[Message]] = None
    tools: list[Tool] = field(default_factory=list)
    think: Optional[bool] = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True
    return_pieces: bool = False
    keep_alive: Optional[float] = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def as_generate(self) -> GenerateRequest:
        """The chat as the GenerateRequest whose prompt it is."""
        return GenerateRequest(model=self.model, messages=list(self.messages or []), tools=self.tools,
                               think=self.think, keep_alive=self.keep_alive, request_id=self.request_id)




@proto(pb.TokenizeResponse)
@dataclass
class TokenizeResult:
    tokens: list[int]
    pieces: list[str] = field(default_factory=list)
    context_length: int = 0
    model: str = ""
    backend: str = ""




@proto(pb.DetokenizeRequest, codecs={"keep_alive": _KEEP_ALIVE})
@dataclass
class DetokenizeRequest:
    model: str
    tokens: list[int]
    keep_alive: Optional[float] = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)




@proto(pb.DetokenizeResponse)
@dataclass
class DetokenizeResult:
    text: str
    model: str = ""
    backend: str = ""

