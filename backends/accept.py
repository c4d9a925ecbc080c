"""The accept step: a request's proto message, checked against the contract and
turned into the engine's typed request in one pass.

Every request that reaches the inference service — from the HTTP front or
from any gRPC client — passes here first, so MLX, the upstream Ollama and the
cloud adapters all see only requests inside the contract's bounds
(``mlxgate/limits.py``) and ranges.  Backends then check only what is theirs
to know (a model's context length, its tool-call format).

Each field is read once: checked, and converted while it is read (JSON
carried as text is parsed here, once).  The first problem stops the pass
with an ``InvalidArgument`` naming the field.  Nothing here looks at the text
of prompts or messages beyond its presence: its size is bounded by the
transport (body and message limits) and its cost by the backend's context
check.  Parts without rules of their own (a prompt, the sampling values
once in range) convert generically (``backends/pbconvert.py``).
"""

from __future__ import annotations

import math
import re
import uuid
from typing import Optional

from backends import images as images_mod
from backends.errors import InvalidArgument
from backends.proto_values import DETAIL_OF_PB, keep_alive_from_pb
from backends.types import (
    DetokenizeRequest,
    EmbedRequest,
    GenerateRequest,
    Message,
    OutputFormat,
    Prompt,
    RerankRequest,
    Sampling,
    TokenizeRequest,
    Tool,
    ToolCall,
    ToolChoice,
)
from mlxgate import limits
from mlxgate.jsonutil import JSONError, loads_object
from mlxgate.v1 import inference_pb2 as pb

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]*$")
_ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant", pb.ROLE_TOOL: "tool"}


def _count(name: str, n: int, most: int) -> None:
    if n > most:
        raise InvalidArgument(f"{name}: at most {most} allowed, got {n}")


def model(name: str) -> str:
    if not name:
        raise InvalidArgument("model is required")
    if len(name) > limits.MAX_MODEL_NAME_CHARS:
        raise InvalidArgument(
            f"model: names are at most {limits.MAX_MODEL_NAME_CHARS} characters, got {len(name)}"
        )
    return name


def request_id(text: str) -> str:
    """The caller's id, or a fresh one when none was sent."""
    if len(text) > limits.MAX_REQUEST_ID_CHARS or not _REQUEST_ID.match(text):
        raise InvalidArgument(
            f"request_id: at most {limits.MAX_REQUEST_ID_CHARS} characters of [A-Za-z0-9._:-]"
        )
    return text or uuid.uuid4().hex


def _json_object(text: str, name: str) -> dict:
    try:
        return loads_object(text, name)
    except JSONError as e:
        raise InvalidArgument(str(e)) from None


def _number(name: str, value: float, lo: Optional[float] = None, hi: Optional[float] = None,
            lo_open: bool = False) -> None:
    if math.isnan(value) or math.isinf(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InvalidArgument(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidArgument(f"{name} must be <= {hi}, got {value}")


def sampling(s: pb.SamplingParams) -> Sampling:
    """The contract's ranges (``limits.SAMPLING_RANGES``), which every backend
    can honour; a dialect or an upstream's API may be stricter (OpenAI's 0-2
    temperature)."""
    for name, (lo, hi, lo_open) in limits.SAMPLING_RANGES.items():
        if s.HasField(name):
            _number(name, getattr(s, name), lo, hi, lo_open)
    _count("stop", len(s.stop), limits.MAX_STOP_SEQUENCES)
    for i, stop in enumerate(s.stop):
        if len(stop) > limits.MAX_STOP_CHARS:
            raise InvalidArgument(f"stop[{i}]: at most {limits.MAX_STOP_CHARS} characters, got {len(stop)}")
    return Sampling.from_pb(s)


def message(m: pb.ChatMessage, name: str) -> Message:
    """One chat message: a role, and tool calls whose arguments are JSON objects."""
    role = _ROLES.get(m.role)
    if role is None:
        raise InvalidArgument(f"{name}.role: every message needs a role (system, user, assistant or tool)")
    _count(f"{name}.tool_calls", len(m.tool_calls), limits.MAX_TOOL_CALLS)
    calls = []
    for j, call in enumerate(m.tool_calls):
        if len(call.name) > limits.MAX_TOOL_NAME_CHARS:
            raise InvalidArgument(f"{name}.tool_calls[{j}].name: at most {limits.MAX_TOOL_NAME_CHARS} characters")
        arguments = _json_object(call.arguments_json, f"{name}.tool_calls[{j}].arguments_json")
        calls.append(ToolCall(name=call.name, arguments=arguments, id=call.id, index=call.index))
    return Message(role=role, content=m.content, images=list(m.images), tool_calls=calls,  # type: ignore[arg-type]
                   tool_name=m.tool_name, tool_call_id=m.tool_call_id, thinking=m.thinking,
                   image_details=_image_details(m, name))


def _image_details(m: pb.ChatMessage, name: str) -> list[str]:
    """None, or one detail per image, each a word the proto names."""
    if m.image_details and len(m.image_details) != len(m.images):
        raise InvalidArgument(f"{name}.image_details: give none or one per image ({len(m.images)}), "
                              f"got {len(m.image_details)}")
    for j, d in enumerate(m.image_details):
        if d not in DETAIL_OF_PB:
            raise InvalidArgument(f"{name}.image_details[{j}]: unknown detail {d}")
    return [DETAIL_OF_PB[d] for d in m.image_details]


def _messages(chat: pb.ChatInput) -> list[Message]:
    _count("messages", len(chat.messages), limits.MAX_MESSAGES)
    return [message(m, f"messages[{i}]") for i, m in enumerate(chat.messages)]


def _tools(tools) -> list[Tool]:
    _count("tools", len(tools), limits.MAX_TOOLS)
    out = []
    for i, t in enumerate(tools):
        if not t.name:
            raise InvalidArgument(f"tools[{i}].name is required")
        if len(t.name) > limits.MAX_TOOL_NAME_CHARS:
            raise InvalidArgument(f"tools[{i}].name: at most {limits.MAX_TOOL_NAME_CHARS} characters")
        out.append(Tool(t.name, t.description, _json_object(t.parameters_json, f"tools[{i}].parameters_json")))
    return out


def _format(f: pb.OutputFormat) -> OutputFormat:
    if f.json_schema:
        # A schema with type unset means JSON_SCHEMA (the type is inferred);
        # with type JSON it is a contradiction, never silently ignored.
        if f.type == pb.FORMAT_TYPE_JSON:
            raise InvalidArgument("format: type JSON takes no json_schema (use JSON_SCHEMA, or leave type unset)")
        return OutputFormat("json_schema", _json_object(f.json_schema, "format.json_schema"))
    if f.type == pb.FORMAT_TYPE_JSON_SCHEMA:
        raise InvalidArgument("format: type JSON_SCHEMA needs json_schema")
    return OutputFormat("json") if f.type == pb.FORMAT_TYPE_JSON else OutputFormat()


def _tool_choice(c: pb.ToolChoice, tools: list[Tool]) -> ToolChoice:
    if c.mode == pb.TOOL_CHOICE_UNSPECIFIED:
        return ToolChoice()
    if c.mode not in (pb.TOOL_CHOICE_REQUIRED, pb.TOOL_CHOICE_FUNCTION):
        raise InvalidArgument(f"tool_choice.mode: unknown value {c.mode}")
    if not tools:
        raise InvalidArgument("tool_choice: a forced call needs tools")
    if c.mode == pb.TOOL_CHOICE_REQUIRED:
        return ToolChoice("required")
    if c.function_name not in {t.name for t in tools}:
        raise InvalidArgument(f"tool_choice names {limits.clip_name(c.function_name)!r}, which is not in tools")
    return ToolChoice("function", c.function_name)


def generate(m: pb.GenerateRequest) -> GenerateRequest:
    """The typed request, or InvalidArgument naming the first field outside the contract."""
    name = model(m.model)
    rid = request_id(m.request_id)
    which = m.WhichOneof("input")
    if which is None:
        raise InvalidArgument("one of prompt or chat is required")
    prompt: Optional[Prompt] = None
    messages: Optional[list[Message]] = None
    if which == "prompt":
        prompt = Prompt.from_pb(m.prompt)
        images = [(f"prompt.images[{j}]", b) for j, b in enumerate(m.prompt.images)]
    else:
        messages = _messages(m.chat)
        images = [(f"messages[{i}].images[{j}]", b) for i, x in enumerate(messages) for j, b in enumerate(x.images)]
    _count("images", len(images), limits.MAX_IMAGES)
    # Header only (dimensions, format, bytes): microseconds, nothing decoded.
    images_mod.check_all(images)
    tools = _tools(m.tools)
    params = sampling(m.sampling)
    output = _format(m.format)
    if not 0 <= m.top_logprobs <= limits.MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in [0, {limits.MAX_TOP_LOGPROBS}], got {m.top_logprobs}")
    choice = _tool_choice(m.tool_choice, tools)
    return GenerateRequest(
        model=name, prompt=prompt, messages=messages, tools=tools, sampling=params, format=output,
        logprobs=m.logprobs, top_logprobs=m.top_logprobs, keep_alive=keep_alive_from_pb(m),
        think=m.think if m.HasField("think") else None, tool_choice=choice, request_id=rid, truncate=m.truncate,
        accepted=m,
    )


def count_tokens(m: pb.CountTokensRequest) -> GenerateRequest:
    """The input to count is accepted as a generation would be."""
    if not m.HasField("request"):
        raise InvalidArgument("request is required")
    return generate(m.request)


def embed(m: pb.EmbedRequest) -> EmbedRequest:
    """Texts or token ids, never both, within the count; no empty token list.

    Whether ids are in the model's vocabulary is the backend's to check (it
    knows the vocabulary); so is an input's length against the context.
    """
    name = model(m.model)
    rid = request_id(m.request_id)
    if m.input and m.input_tokens:
        raise InvalidArgument("input and input_tokens are exclusive: send texts or token ids, not both")
    _count("input", len(m.input), limits.MAX_EMBED_INPUTS)
    _count("input_tokens", len(m.input_tokens), limits.MAX_EMBED_INPUTS)
    for i, tokens in enumerate(m.input_tokens):
        if not tokens.ids:
            raise InvalidArgument(f"input_tokens[{i}]: empty token list")
    if m.dimensions < 0:
        raise InvalidArgument(f"dimensions must be >= 0, got {m.dimensions}")
    return EmbedRequest(
        model=name, inputs=list(m.input), input_tokens=[list(t.ids) for t in m.input_tokens],
        truncate=m.truncate if m.HasField("truncate") else True, dimensions=m.dimensions,
        keep_alive=keep_alive_from_pb(m), request_id=rid, accepted=m,
    )


def rerank(m: pb.RerankRequest) -> RerankRequest:
    """A query, 1 to ``MAX_RERANK_DOCUMENTS`` non-empty documents, top_n >= 0.

    The tokens of the documents together (``MAX_RERANK_TOKENS``) are the
    backend's to count: it holds the tokenizer."""
    name = model(m.model)
    rid = request_id(m.request_id)
    if not m.query:
        raise InvalidArgument("query is required")
    if not m.documents:
        raise InvalidArgument("documents: at least one document is required")
    _count("documents", len(m.documents), limits.MAX_RERANK_DOCUMENTS)
    for i, doc in enumerate(m.documents):
        if not doc:
            raise InvalidArgument(f"documents[{i}]: empty document")
    if m.top_n < 0:
        raise InvalidArgument(f"top_n must be >= 0, got {m.top_n}")
    if len(m.instruction) > limits.MAX_RERANK_INSTRUCTION_CHARS:
        raise InvalidArgument(
            f"instruction: at most {limits.MAX_RERANK_INSTRUCTION_CHARS} characters, got {len(m.instruction)}"
        )
    return RerankRequest(model=name, query=m.query, documents=list(m.documents), top_n=m.top_n,
                         instruction=m.instruction, keep_alive=keep_alive_from_pb(m), request_id=rid)


def tokenize(m: pb.TokenizeRequest) -> TokenizeRequest:
    """Text or a chat (accepted as a Generate's chat, with its tools)."""
    name = model(m.model)
    rid = request_id(m.request_id)
    which = m.WhichOneof("input")
    if which is None:
        raise InvalidArgument("one of text or chat is required")
    if which == "text" and m.tools:
        raise InvalidArgument("tools: only a chat is tokenized with tools")
    chat = generate(pb.GenerateRequest(model=name, chat=m.chat, tools=m.tools)) if which == "chat" else None
    return TokenizeRequest(
        model=name, text=m.text if which == "text" else None,
        messages=chat.messages if chat is not None else None, tools=chat.tools if chat is not None else [],
        think=m.think if m.HasField("think") else None, add_special_tokens=m.add_special_tokens,
        add_generation_prompt=m.add_generation_prompt if m.HasField("add_generation_prompt") else True,
        return_pieces=m.return_pieces, keep_alive=keep_alive_from_pb(m), request_id=rid,
    )


def detokenize(m: pb.DetokenizeRequest) -> DetokenizeRequest:
    """At most ``MAX_DETOKENIZE_TOKENS`` ids; whether each is in the
    vocabulary is the backend's to check."""
    name = model(m.model)
    rid = request_id(m.request_id)
    _count("tokens", len(m.tokens), limits.MAX_DETOKENIZE_TOKENS)
    return DetokenizeRequest(model=name, tokens=list(m.tokens), keep_alive=keep_alive_from_pb(m), request_id=rid)
