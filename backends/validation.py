"""The one validation of a request against the contract, before routing.

Every request that reaches the inference service — from the HTTP front or
from any gRPC client — passes here first, so MLX, the upstream Ollama and the
cloud adapters all see only requests inside the contract's bounds
(``mlxgate/limits.py``) and ranges.  Backends then check only what is theirs
to know (a model's context length, its tool-call format).

Checks work on the proto message, before any conversion, and stop at the
first problem with an ``InvalidArgument`` naming the field.  Nothing here
looks at the text of prompts or messages beyond its presence: its size is
bounded by the transport (body and message limits) and its cost by the
backend's context check.
"""

from __future__ import annotations

import math
import re
from typing import Optional

from backends import images as images_mod
from backends.errors import InvalidArgument
from mlxgate import limits
from mlxgate.jsonutil import JSONError, loads_object
from mlxgate.v1 import inference_pb2 as pb

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]*$")


def _count(name: str, n: int, most: int) -> None:
    if n > most:
        raise InvalidArgument(f"{name}: at most {most} allowed, got {n}")


def check_model(model: str) -> None:
    if not model:
        raise InvalidArgument("model is required")
    if len(model) > limits.MAX_MODEL_NAME_CHARS:
        raise InvalidArgument(
            f"model: names are at most {limits.MAX_MODEL_NAME_CHARS} characters, got {len(model)}"
        )


def check_request_id(request_id: str) -> None:
    if len(request_id) > limits.MAX_REQUEST_ID_CHARS or not _REQUEST_ID.match(request_id):
        raise InvalidArgument(
            f"request_id: at most {limits.MAX_REQUEST_ID_CHARS} characters of [A-Za-z0-9._:-]"
        )


def _json_object(text: str, name: str) -> None:
    try:
        loads_object(text, name)
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


def check_sampling(s: pb.SamplingParams) -> None:
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


def _check_tool_calls(calls, name: str) -> None:
    _count(f"{name}.tool_calls", len(calls), limits.MAX_TOOL_CALLS)
    for j, call in enumerate(calls):
        if len(call.name) > limits.MAX_TOOL_NAME_CHARS:
            raise InvalidArgument(f"{name}.tool_calls[{j}].name: at most {limits.MAX_TOOL_NAME_CHARS} characters")
        _json_object(call.arguments_json, f"{name}.tool_calls[{j}].arguments_json")


#: The proto's roles (``pb.Role.values()`` builds a new list on every call).
_ROLES = frozenset(pb.Role.values())


def check_generate(req: pb.GenerateRequest) -> None:
    """Raise InvalidArgument naming the first field outside the contract."""
    check_model(req.model)
    check_request_id(req.request_id)
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidArgument("one of prompt or chat is required")
    images: list[tuple[str, bytes]] = []
    if which == "prompt":
        images = [(f"prompt.images[{j}]", b) for j, b in enumerate(req.prompt.images)]
    else:
        msgs = req.chat.messages
        _count("messages", len(msgs), limits.MAX_MESSAGES)
        for i, m in enumerate(msgs):
            if m.role == pb.ROLE_UNSPECIFIED or m.role not in _ROLES:
                raise InvalidArgument(
                    f"messages[{i}].role: every message needs a role (system, user, assistant or tool)"
                )
            images += [(f"messages[{i}].images[{j}]", b) for j, b in enumerate(m.images)]
            if m.tool_calls:
                _check_tool_calls(m.tool_calls, f"messages[{i}]")
    _count("images", len(images), limits.MAX_IMAGES)
    # Header only (dimensions, format, bytes): microseconds, nothing decoded.
    images_mod.check_all(images)
    _count("tools", len(req.tools), limits.MAX_TOOLS)
    names = set()
    for i, t in enumerate(req.tools):
        if not t.name:
            raise InvalidArgument(f"tools[{i}].name is required")
        if len(t.name) > limits.MAX_TOOL_NAME_CHARS:
            raise InvalidArgument(f"tools[{i}].name: at most {limits.MAX_TOOL_NAME_CHARS} characters")
        _json_object(t.parameters_json, f"tools[{i}].parameters_json")
        names.add(t.name)
    check_sampling(req.sampling)
    if req.format.json_schema:
        # A schema with type unset means JSON_SCHEMA (the type is inferred);
        # with type JSON it is a contradiction, never silently ignored.
        if req.format.type == pb.FORMAT_TYPE_JSON:
            raise InvalidArgument("format: type JSON takes no json_schema (use JSON_SCHEMA, or leave type unset)")
        _json_object(req.format.json_schema, "format.json_schema")
    elif req.format.type == pb.FORMAT_TYPE_JSON_SCHEMA:
        raise InvalidArgument("format: type JSON_SCHEMA needs json_schema")
    if not 0 <= req.top_logprobs <= limits.MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in [0, {limits.MAX_TOP_LOGPROBS}], got {req.top_logprobs}")
    mode = req.tool_choice.mode
    if mode not in (pb.TOOL_CHOICE_UNSPECIFIED, pb.TOOL_CHOICE_REQUIRED, pb.TOOL_CHOICE_FUNCTION):
        raise InvalidArgument(f"tool_choice.mode: unknown value {mode}")
    if mode != pb.TOOL_CHOICE_UNSPECIFIED and not req.tools:
        raise InvalidArgument("tool_choice: a forced call needs tools")
    if mode == pb.TOOL_CHOICE_FUNCTION and req.tool_choice.function_name not in names:
        raise InvalidArgument(
            f"tool_choice names {limits.clip_name(req.tool_choice.function_name)!r}, which is not in tools"
        )


def check_count_tokens(req: pb.CountTokensRequest) -> None:
    """The input to count is checked as a generation would be."""
    if not req.HasField("request"):
        raise InvalidArgument("request is required")
    check_generate(req.request)


def check_embed(req: pb.EmbedRequest) -> None:
    """Texts or token ids, never both, within the count; no empty token list.

    Whether ids are in the model's vocabulary is the backend's to check (it
    knows the vocabulary); so is an input's length against the context.
    """
    check_model(req.model)
    check_request_id(req.request_id)
    if req.input and req.input_tokens:
        raise InvalidArgument("input and input_tokens are exclusive: send texts or token ids, not both")
    _count("input", len(req.input), limits.MAX_EMBED_INPUTS)
    _count("input_tokens", len(req.input_tokens), limits.MAX_EMBED_INPUTS)
    for i, tokens in enumerate(req.input_tokens):
        if not tokens.ids:
            raise InvalidArgument(f"input_tokens[{i}]: empty token list")
    if req.dimensions < 0:
        raise InvalidArgument(f"dimensions must be >= 0, got {req.dimensions}")


def check_rerank(req: pb.RerankRequest) -> None:
    """A query, 1 to ``MAX_RERANK_DOCUMENTS`` non-empty documents, top_n >= 0.

    The tokens of the documents together (``MAX_RERANK_TOKENS``) are the
    backend's to count: it holds the tokenizer."""
    check_model(req.model)
    check_request_id(req.request_id)
    if not req.query:
        raise InvalidArgument("query is required")
    if not req.documents:
        raise InvalidArgument("documents: at least one document is required")
    _count("documents", len(req.documents), limits.MAX_RERANK_DOCUMENTS)
    for i, doc in enumerate(req.documents):
        if not doc:
            raise InvalidArgument(f"documents[{i}]: empty document")
    if req.top_n < 0:
        raise InvalidArgument(f"top_n must be >= 0, got {req.top_n}")
    if len(req.instruction) > limits.MAX_RERANK_INSTRUCTION_CHARS:
        raise InvalidArgument(
            f"instruction: at most {limits.MAX_RERANK_INSTRUCTION_CHARS} characters, got {len(req.instruction)}"
        )


def check_tokenize(req: pb.TokenizeRequest) -> None:
    """Text or a chat (checked as a Generate's chat, with its tools)."""
    check_model(req.model)
    check_request_id(req.request_id)
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidArgument("one of text or chat is required")
    if which == "chat":
        check_generate(pb.GenerateRequest(model=req.model, chat=req.chat, tools=req.tools))
    elif req.tools:
        raise InvalidArgument("tools: only a chat is tokenized with tools")


def check_detokenize(req: pb.DetokenizeRequest) -> None:
    """At most ``MAX_DETOKENIZE_TOKENS`` ids; whether each is in the
    vocabulary is the backend's to check."""
    check_model(req.model)
    check_request_id(req.request_id)
    _count("tokens", len(req.tokens), limits.MAX_DETOKENIZE_TOKENS)
