"""Domain types every backend speaks, with their proto conversions beside them.

Backends never see protobuf messages: the inference service converts a
request with ``from_pb`` and each event or result a backend returns with
``to_pb``.  The remote backend (``backends/remote``), a client of another
mlxgate service, needs the other two directions: requests ``to_pb`` and
events and results ``from_pb``; each type that travels that way has them
here too, so ``X.from_pb(x.to_pb()) == x`` (tests/test_types_roundtrip.py).
The HTTP front builds and reads proto messages itself
(``gateway/*/translate.py``), so these types stay inside the service.
Keeping conversion here (TGI's pattern) means handlers stay thin and a proto
change touches one file.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Optional, Union, get_args

from google.protobuf import duration_pb2, timestamp_pb2

from backends.errors import InvalidArgument
from mlxgate import limits
from mlxgate.dialects.base import caller_arguments, produced_arguments
from mlxgate.jsonutil import JSONError, loads_object
from mlxgate.v1 import inference_pb2 as pb

# ---------------------------------------------------------------- helpers

_ROLE_TO_PB = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
_PB_TO_ROLE = {v: k for k, v in _ROLE_TO_PB.items()}

FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)
_FINISH_TO_PB = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "error": pb.FINISH_REASON_ERROR,
}
_PB_TO_FINISH = {v: k for k, v in _FINISH_TO_PB.items()}

CAPABILITIES = ("completion", "tools", "embedding", "insert", "vision", "thinking")
_CAP_TO_PB = {
    "completion": pb.CAPABILITY_COMPLETION,
    "tools": pb.CAPABILITY_TOOLS,
    "embedding": pb.CAPABILITY_EMBEDDING,
    "insert": pb.CAPABILITY_INSERT,
    "vision": pb.CAPABILITY_VISION,
    "thinking": pb.CAPABILITY_THINKING,
}
_PB_TO_CAP = {v: k for k, v in _CAP_TO_PB.items()}


#: Longer than this means "keep loaded" (limits.py).
KEEP_ALIVE_FOREVER_S = limits.KEEP_ALIVE_FOREVER_S


def normalize_keep_alive(seconds: Optional[float]) -> Optional[float]:
    """None stays None (the default); negative or beyond ~290 years is -1 (keep loaded)."""
    if seconds is None:
        return None
    if math.isnan(seconds):
        raise InvalidArgument("keep_alive: not a number")
    return -1.0 if seconds < 0 or seconds > KEEP_ALIVE_FOREVER_S else float(seconds)


def keep_alive_from_pb(msg: pb.GenerateRequest | pb.EmbedRequest | pb.LoadModelRequest) -> Optional[float]:
    """Seconds, or None when the caller left keep_alive unset."""
    if not msg.HasField("keep_alive"):
        return None
    return normalize_keep_alive(msg.keep_alive.seconds + msg.keep_alive.nanos / 1e9)


def keep_alive_to_pb(seconds: Optional[float]) -> Optional[duration_pb2.Duration]:
    """The Duration ``keep_alive_from_pb`` reads back (None: leave it unset)."""
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _from_ts(m: Any, name: str) -> Optional[datetime]:
    return getattr(m, name).ToDatetime(tzinfo=timezone.utc) if m.HasField(name) else None


def _ts(dt: Optional[datetime]) -> Optional[timestamp_pb2.Timestamp]:
    if dt is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(dt.astimezone(timezone.utc))
    return t


def _json_or_empty(text: str, field_name: str) -> dict:
    """A JSON object sent as text by a caller (the caller rule of
    ``mlxgate.dialects.base``): bad, deep or non-object JSON is INVALID_ARGUMENT, named."""
    try:
        return caller_arguments(text, field_name)
    except JSONError as e:
        raise InvalidArgument(str(e)) from None


# ---------------------------------------------------------------- request


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""
    index: int = 0

    def to_pb(self) -> pb.ToolCall:
        return pb.ToolCall(
            id=self.id, name=self.name, arguments_json=json.dumps(self.arguments, ensure_ascii=False), index=self.index
        )

    @classmethod
    def from_pb(cls, m: pb.ToolCall) -> "ToolCall":
        """A call a *caller* sent (history): its arguments must be an object."""
        arguments = _json_or_empty(m.arguments_json, "tool_calls.arguments_json")
        return cls(name=m.name, arguments=arguments, id=m.id, index=m.index)

    @classmethod
    def produced_from_pb(cls, m: pb.ToolCall) -> "ToolCall":
        """A call a model *produced* (an answer from another service): kept
        whatever its arguments are (``produced_arguments``)."""
        return cls(name=m.name, arguments=produced_arguments(m.arguments_json), id=m.id, index=m.index)


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


    def to_pb(self) -> pb.ChatMessage:
        return pb.ChatMessage(
            role=_ROLE_TO_PB[self.role],
            content=self.content,
            images=self.images,
            tool_calls=[t.to_pb() for t in self.tool_calls],
            tool_name=self.tool_name,
            tool_call_id=self.tool_call_id,
            thinking=self.thinking,
        )

    @classmethod
    def from_pb(cls, m: pb.ChatMessage) -> "Message":
        if m.role not in _PB_TO_ROLE:
            raise InvalidArgument("messages: every message needs a role (system, user, assistant or tool)")
        return cls(
            role=_PB_TO_ROLE[m.role],  # type: ignore[arg-type]
            content=m.content,
            images=list(m.images),
            tool_calls=[ToolCall.from_pb(t) for t in m.tool_calls],
            tool_name=m.tool_name,
            tool_call_id=m.tool_call_id,
            thinking=m.thinking,
        )

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


@dataclass
class Prompt:
    prompt: str
    suffix: str = ""
    system: str = ""
    raw: bool = False
    images: list[bytes] = field(default_factory=list)


    def to_pb(self) -> pb.PromptInput:
        return pb.PromptInput(prompt=self.prompt, suffix=self.suffix, system=self.system, raw=self.raw,
                              images=self.images)

    @classmethod
    def from_pb(cls, m: pb.PromptInput) -> "Prompt":
        return cls(prompt=m.prompt, suffix=m.suffix, system=m.system, raw=m.raw, images=list(m.images))


@dataclass
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)


    def to_pb(self) -> pb.Tool:
        parameters = json.dumps(self.parameters, ensure_ascii=False) if self.parameters else ""
        return pb.Tool(name=self.name, description=self.description, parameters_json=parameters)

    @classmethod
    def from_pb(cls, m: pb.Tool) -> "Tool":
        parameters = _json_or_empty(m.parameters_json, "tools.parameters_json")
        return cls(name=m.name, description=m.description, parameters=parameters)

    def to_template_dict(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


_SAMPLING_OPTIONAL = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "num_ctx",
)


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


    def to_pb(self) -> pb.SamplingParams:
        kw = {k: v for k in _SAMPLING_OPTIONAL if (v := getattr(self, k)) is not None}
        return pb.SamplingParams(stop=self.stop, **kw)

    @classmethod
    def from_pb(cls, m: pb.SamplingParams) -> "Sampling":
        kw = {k: getattr(m, k) for k in _SAMPLING_OPTIONAL if m.HasField(k)}
        return cls(stop=list(m.stop), **kw)


@dataclass
class OutputFormat:
    kind: Literal["text", "json", "json_schema"] = "text"
    schema: Optional[dict] = None


    def to_pb(self) -> pb.OutputFormat:
        if self.kind == "json":
            return pb.OutputFormat(type=pb.FORMAT_TYPE_JSON)
        if self.kind == "json_schema":
            return pb.OutputFormat(type=pb.FORMAT_TYPE_JSON_SCHEMA,
                                   json_schema=json.dumps(self.schema or {}, ensure_ascii=False))
        return pb.OutputFormat()

    @classmethod
    def from_pb(cls, m: pb.OutputFormat) -> "OutputFormat":
        if m.type == pb.FORMAT_TYPE_JSON:
            return cls("json")
        if m.type == pb.FORMAT_TYPE_JSON_SCHEMA or (m.type == pb.FORMAT_TYPE_UNSPECIFIED and m.json_schema):
            # A schema with no type set is a schema (never silently ignored).
            if not m.json_schema:
                raise InvalidArgument("format: type JSON_SCHEMA needs json_schema")
            return cls("json_schema", _json_or_empty(m.json_schema, "format.json_schema"))
        return cls("text")


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


    def to_pb(self) -> pb.ToolChoice:
        if self.mode == "required":
            return pb.ToolChoice(mode=pb.TOOL_CHOICE_REQUIRED)
        if self.mode == "function":
            return pb.ToolChoice(mode=pb.TOOL_CHOICE_FUNCTION, function_name=self.function_name)
        return pb.ToolChoice()

    @classmethod
    def from_pb(cls, m: pb.ToolChoice) -> "ToolChoice":
        if m.mode == pb.TOOL_CHOICE_REQUIRED:
            return cls("required")
        if m.mode == pb.TOOL_CHOICE_FUNCTION:
            return cls("function", m.function_name)
        return cls()


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


    def to_pb(self) -> pb.GenerateRequest:
        """The request as another mlxgate service takes it (``from_pb`` reads it back)."""
        m = pb.GenerateRequest(
            request_id=self.request_id,
            model=self.model,
            tools=[t.to_pb() for t in self.tools],
            sampling=self.sampling.to_pb(),
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            keep_alive=keep_alive_to_pb(self.keep_alive),
        )
        if self.format.kind != "text":
            m.format.CopyFrom(self.format.to_pb())
        if self.tool_choice.forced:
            m.tool_choice.CopyFrom(self.tool_choice.to_pb())
        if self.prompt is not None:
            m.prompt.CopyFrom(self.prompt.to_pb())
        else:
            m.chat.CopyFrom(pb.ChatInput(messages=[x.to_pb() for x in self.messages or []]))
        if self.think is not None:
            m.think = self.think
        if self.truncate:
            m.truncate = True
        return m

    @classmethod
    def from_pb(cls, m: pb.GenerateRequest) -> "GenerateRequest":
        which = m.WhichOneof("input")
        req = cls(
            model=m.model,
            prompt=Prompt.from_pb(m.prompt) if which == "prompt" else None,
            messages=[Message.from_pb(x) for x in m.chat.messages] if which == "chat" else None,
            tools=[Tool.from_pb(t) for t in m.tools],
            sampling=Sampling.from_pb(m.sampling),
            format=OutputFormat.from_pb(m.format),
            logprobs=m.logprobs,
            top_logprobs=m.top_logprobs,
            keep_alive=keep_alive_from_pb(m),
            think=m.think if m.HasField("think") else None,
            tool_choice=ToolChoice.from_pb(m.tool_choice),
            request_id=m.request_id or uuid.uuid4().hex,
            truncate=m.truncate,
        )
        req.tool_choice.check(req.tools)
        return req


# ---------------------------------------------------------------- events


@dataclass
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)

    def to_pb(self) -> pb.TokenLogprob:
        return pb.TokenLogprob(
            token_id=self.token_id,
            token=self.token,
            logprob=self.logprob,
            top_logprobs=[pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in self.top],
        )

    @classmethod
    def from_pb(cls, m: pb.TokenLogprob) -> "TokenLogprob":
        return cls(
            token_id=m.token_id,
            token=m.token,
            logprob=m.logprob,
            top=[TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in m.top_logprobs],
        )


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

    def to_pb(self) -> pb.GenerateResponse:
        # Filled in place (a ``pb.Chunk`` passed to the constructor is built,
        # then copied), unset fields left alone: one per event of every stream.
        out = pb.GenerateResponse()
        c = out.chunk
        c.SetInParent()
        if self.text:
            c.text = self.text
        if self.token_ids:
            c.token_ids.extend(self.token_ids)
        if self.tool_calls:
            c.tool_calls.extend([t.to_pb() for t in self.tool_calls])
        if self.logprobs:
            c.logprobs.extend([lp.to_pb() for lp in self.logprobs])
        if self.backend:
            c.backend = self.backend
        if self.model:
            c.model = self.model
        if self.thinking:
            c.thinking = self.thinking
        return out

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

    @classmethod
    def from_pb(cls, m: pb.Chunk) -> "Chunk":
        return cls(
            text=m.text,
            token_ids=list(m.token_ids),
            tool_calls=[ToolCall.produced_from_pb(t) for t in m.tool_calls],
            logprobs=[TokenLogprob.from_pb(lp) for lp in m.logprobs],
            backend=m.backend,
            model=m.model,
            thinking=m.thinking,
        )


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

    def to_pb(self) -> pb.GenerateResponse:
        # Filled in place, as ``Chunk.to_pb`` (a third of the time of a
        # ``pb.Done`` built with keywords and copied into the response).
        out = pb.GenerateResponse()
        d = out.done
        d.SetInParent()
        d.finish_reason = _FINISH_TO_PB[self.finish_reason]
        d.prompt_tokens = self.prompt_tokens
        d.completion_tokens = self.completion_tokens
        d.cached_prompt_tokens = self.cached_prompt_tokens
        d.load_duration_ns = self.load_duration_ns
        d.prompt_eval_duration_ns = self.prompt_eval_duration_ns
        d.eval_duration_ns = self.eval_duration_ns
        d.total_duration_ns = self.total_duration_ns
        d.backend = self.backend
        d.model = self.model
        d.error_message = self.error_message
        d.stop_sequence = self.stop_sequence
        return out

    @classmethod
    def from_pb(cls, m: pb.Done) -> "Done":
        return cls(
            finish_reason=_PB_TO_FINISH.get(m.finish_reason, "stop"),  # type: ignore[arg-type]
            prompt_tokens=m.prompt_tokens,
            completion_tokens=m.completion_tokens,
            cached_prompt_tokens=m.cached_prompt_tokens,
            load_duration_ns=m.load_duration_ns,
            prompt_eval_duration_ns=m.prompt_eval_duration_ns,
            eval_duration_ns=m.eval_duration_ns,
            total_duration_ns=m.total_duration_ns,
            backend=m.backend,
            model=m.model,
            error_message=m.error_message,
            stop_sequence=m.stop_sequence,
        )


def event_from_pb(m: pb.GenerateResponse) -> Optional["Event"]:
    """A streamed response as a Chunk or Done (None: neither is set)."""
    which = m.WhichOneof("event")
    if which == "chunk":
        return Chunk.from_pb(m.chunk)
    if which == "done":
        return Done.from_pb(m.done)
    return None


Event = Union[Chunk, Done]


@dataclass
class TokenCount:
    """What ``Backend.count_tokens`` answers: the prompt tokens of a request's input."""

    input_tokens: int
    backend: str = ""
    model: str = ""

    def to_pb(self) -> pb.CountTokensResponse:
        return pb.CountTokensResponse(input_tokens=self.input_tokens, backend=self.backend, model=self.model)

    @classmethod
    def from_pb(cls, m: pb.CountTokensResponse) -> "TokenCount":
        return cls(input_tokens=m.input_tokens, backend=m.backend, model=m.model)


# ---------------------------------------------------------------- embeddings


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


    def to_pb(self) -> pb.EmbedRequest:
        return pb.EmbedRequest(
            request_id=self.request_id,
            model=self.model,
            input=self.inputs,
            input_tokens=[pb.TokenIds(ids=ids) for ids in self.input_tokens],
            truncate=self.truncate,
            dimensions=self.dimensions,
            keep_alive=keep_alive_to_pb(self.keep_alive),
        )

    @classmethod
    def from_pb(cls, m: pb.EmbedRequest) -> "EmbedRequest":
        return cls(
            model=m.model,
            inputs=list(m.input),
            input_tokens=[list(t.ids) for t in m.input_tokens],
            truncate=m.truncate if m.HasField("truncate") else True,
            dimensions=m.dimensions,
            keep_alive=keep_alive_from_pb(m),
            request_id=m.request_id or uuid.uuid4().hex,
        )


@dataclass
class EmbedResult:
    embeddings: list[list[float]]
    prompt_tokens: int = 0
    model: str = ""
    backend: str = ""
    load_duration_ns: int = 0
    total_duration_ns: int = 0

    def to_pb(self) -> pb.EmbedResponse:
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v) for v in self.embeddings],
            prompt_tokens=self.prompt_tokens,
            model=self.model,
            backend=self.backend,
            load_duration_ns=self.load_duration_ns,
            total_duration_ns=self.total_duration_ns,
        )

    @classmethod
    def from_pb(cls, m: pb.EmbedResponse) -> "EmbedResult":
        return cls(
            embeddings=[list(e.values) for e in m.embeddings],
            prompt_tokens=m.prompt_tokens,
            model=m.model,
            backend=m.backend,
            load_duration_ns=m.load_duration_ns,
            total_duration_ns=m.total_duration_ns,
        )


# ---------------------------------------------------------------- models


@dataclass
class ModelDetails:
    family: str = ""
    families: list[str] = field(default_factory=list)
    parameter_count: int = 0
    parameter_size: str = ""
    quantization_level: str = ""
    format: str = ""

    def to_pb(self) -> pb.ModelDetails:
        return pb.ModelDetails(
            family=self.family,
            families=self.families,
            parameter_count=self.parameter_count,
            parameter_size=self.parameter_size,
            quantization_level=self.quantization_level,
            format=self.format,
        )

    @classmethod
    def from_pb(cls, m: pb.ModelDetails) -> "ModelDetails":
        return cls(
            family=m.family,
            families=list(m.families),
            parameter_count=m.parameter_count,
            parameter_size=m.parameter_size,
            quantization_level=m.quantization_level,
            format=m.format,
        )


@dataclass
class ModelInfo:
    name: str
    backend: str
    size_bytes: int = 0
    digest: str = ""
    modified_at: Optional[datetime] = None
    details: ModelDetails = field(default_factory=ModelDetails)
    fallbacks: list[str] = field(default_factory=list)

    def to_pb(self) -> pb.ModelInfo:
        return pb.ModelInfo(
            name=self.name,
            backend=self.backend,
            size_bytes=self.size_bytes,
            digest=self.digest,
            modified_at=_ts(self.modified_at),
            details=self.details.to_pb(),
            fallbacks=self.fallbacks,
        )

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> "ModelInfo":
        return cls(
            name=m.name,
            backend=m.backend,
            size_bytes=m.size_bytes,
            digest=m.digest,
            modified_at=_from_ts(m, "modified_at"),
            details=ModelDetails.from_pb(m.details),
            fallbacks=list(m.fallbacks),
        )


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

    def to_pb(self) -> pb.ShowModelResponse:
        return pb.ShowModelResponse(
            model=self.info.to_pb(),
            chat_template=self.chat_template,
            context_length=self.context_length,
            capabilities=[_CAP_TO_PB[c] for c in self.capabilities if c in _CAP_TO_PB],
            config_json=json.dumps(self.config),
            license=self.license,
            system=self.system,
            parameters=self.parameters.to_pb(),
            messages=[m.to_pb() for m in self.messages],
            parent_model=self.parent_model,
        )

    @classmethod
    def from_pb(cls, m: pb.ShowModelResponse) -> "ModelShow":
        try:
            config = loads_object(m.config_json, "config_json") if m.config_json else {}
        except JSONError:
            config = {}
        return cls(
            info=ModelInfo.from_pb(m.model),
            chat_template=m.chat_template,
            context_length=m.context_length,
            capabilities=[_PB_TO_CAP[c] for c in m.capabilities if c in _PB_TO_CAP],
            config=config,
            license=m.license,
            system=m.system,
            parameters=Sampling.from_pb(m.parameters),
            messages=[Message.from_pb(x) for x in m.messages],
            parent_model=m.parent_model,
        )


@dataclass
class RunningModel:
    name: str
    backend: str
    size_bytes: int = 0
    expires_at: Optional[datetime] = None  # None: kept loaded with no expiry
    context_length: int = 0
    details: ModelDetails = field(default_factory=ModelDetails)

    def to_pb(self) -> pb.RunningModel:
        return pb.RunningModel(
            name=self.name,
            backend=self.backend,
            size_bytes=self.size_bytes,
            expires_at=_ts(self.expires_at),
            context_length=self.context_length,
            details=self.details.to_pb(),
        )

    @classmethod
    def from_pb(cls, m: pb.RunningModel) -> "RunningModel":
        return cls(
            name=m.name,
            backend=m.backend,
            size_bytes=m.size_bytes,
            expires_at=_from_ts(m, "expires_at"),
            context_length=m.context_length,
            details=ModelDetails.from_pb(m.details),
        )


@dataclass
class LoadResult:
    model: str
    backend: str
    load_duration_ns: int = 0

    def to_pb(self) -> pb.LoadModelResponse:
        return pb.LoadModelResponse(model=self.model, backend=self.backend, load_duration_ns=self.load_duration_ns)

    @classmethod
    def from_pb(cls, m: pb.LoadModelResponse) -> "LoadResult":
        return cls(model=m.model, backend=m.backend, load_duration_ns=m.load_duration_ns)


# ---------------------------------------------------------------- rerank, tokenize, detokenize


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

    def to_pb(self) -> pb.RerankRequest:
        return pb.RerankRequest(
            request_id=self.request_id, model=self.model, query=self.query, documents=self.documents,
            top_n=self.top_n, instruction=self.instruction, keep_alive=keep_alive_to_pb(self.keep_alive),
        )

    @classmethod
    def from_pb(cls, m: pb.RerankRequest) -> "RerankRequest":
        return cls(
            model=m.model, query=m.query, documents=list(m.documents), top_n=m.top_n,
            instruction=m.instruction, keep_alive=keep_alive_from_pb(m),
            request_id=m.request_id or uuid.uuid4().hex,
        )


@dataclass
class RerankResult:
    """Scores by document, best first: ``ranked`` holds (index, score) pairs."""

    ranked: list[tuple[int, float]]
    total_tokens: int = 0
    model: str = ""
    backend: str = ""
    method: str = ""

    def to_pb(self) -> pb.RerankResponse:
        return pb.RerankResponse(
            results=[pb.RerankResult(index=i, relevance_score=s) for i, s in self.ranked],
            total_tokens=self.total_tokens, model=self.model, backend=self.backend, method=self.method,
        )

    @classmethod
    def from_pb(cls, m: pb.RerankResponse) -> "RerankResult":
        return cls(
            ranked=[(r.index, r.relevance_score) for r in m.results], total_tokens=m.total_tokens,
            model=m.model, backend=m.backend, method=m.method,
        )


def rank(scores: list[float], top_n: int) -> list[tuple[int, float]]:
    """(index, score) pairs, highest score first, equal scores in the
    documents' order; the first ``top_n`` (0: all)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable
    if top_n > 0:
        order = order[:top_n]
    return [(i, scores[i]) for i in order]


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

    def to_pb(self) -> pb.TokenizeRequest:
        m = pb.TokenizeRequest(
            request_id=self.request_id, model=self.model, tools=[t.to_pb() for t in self.tools],
            add_special_tokens=self.add_special_tokens, add_generation_prompt=self.add_generation_prompt,
            return_pieces=self.return_pieces, keep_alive=keep_alive_to_pb(self.keep_alive),
        )
        if self.text is not None:
            m.text = self.text
        else:
            m.chat.CopyFrom(pb.ChatInput(messages=[x.to_pb() for x in self.messages or []]))
        if self.think is not None:
            m.think = self.think
        return m

    @classmethod
    def from_pb(cls, m: pb.TokenizeRequest) -> "TokenizeRequest":
        which = m.WhichOneof("input")
        return cls(
            model=m.model,
            text=m.text if which == "text" else None,
            messages=[Message.from_pb(x) for x in m.chat.messages] if which == "chat" else None,
            tools=[Tool.from_pb(t) for t in m.tools],
            think=m.think if m.HasField("think") else None,
            add_special_tokens=m.add_special_tokens,
            add_generation_prompt=m.add_generation_prompt if m.HasField("add_generation_prompt") else True,
            return_pieces=m.return_pieces,
            keep_alive=keep_alive_from_pb(m),
            request_id=m.request_id or uuid.uuid4().hex,
        )


@dataclass
class TokenizeResult:
    tokens: list[int]
    pieces: list[str] = field(default_factory=list)
    context_length: int = 0
    model: str = ""
    backend: str = ""

    def to_pb(self) -> pb.TokenizeResponse:
        return pb.TokenizeResponse(tokens=self.tokens, pieces=self.pieces, context_length=self.context_length,
                                   model=self.model, backend=self.backend)

    @classmethod
    def from_pb(cls, m: pb.TokenizeResponse) -> "TokenizeResult":
        return cls(tokens=list(m.tokens), pieces=list(m.pieces), context_length=m.context_length,
                   model=m.model, backend=m.backend)


@dataclass
class DetokenizeRequest:
    model: str
    tokens: list[int]
    keep_alive: Optional[float] = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_pb(self) -> pb.DetokenizeRequest:
        return pb.DetokenizeRequest(request_id=self.request_id, model=self.model, tokens=self.tokens,
                                    keep_alive=keep_alive_to_pb(self.keep_alive))

    @classmethod
    def from_pb(cls, m: pb.DetokenizeRequest) -> "DetokenizeRequest":
        return cls(model=m.model, tokens=list(m.tokens), keep_alive=keep_alive_from_pb(m),
                   request_id=m.request_id or uuid.uuid4().hex)


@dataclass
class DetokenizeResult:
    text: str
    model: str = ""
    backend: str = ""

    def to_pb(self) -> pb.DetokenizeResponse:
        return pb.DetokenizeResponse(text=self.text, model=self.model, backend=self.backend)

    @classmethod
    def from_pb(cls, m: pb.DetokenizeResponse) -> "DetokenizeResult":
        return cls(text=m.text, model=m.model, backend=m.backend)
