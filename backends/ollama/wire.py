"""Domain types <-> Ollama REST JSON, through the one declaration of the
dialect (``mlxgate/dialects/ollama.py``) that the HTTP front uses too.

Requests are built as the dialect's request models and dumped (so an option
name, a field or a base64 image travels exactly as the front parses it);
answers are read against its response shapes (``TypedDict``s: read, not
validated, line by line), with its done-reason map and the rule for tool-call
arguments an upstream produced (``mlxgate.dialects.base.produced_arguments``).
Pure functions, no I/O, so the translation is testable on its own.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Optional

from pydantic import ValidationError

from backends.errors import InvalidArgument, Unimplemented
from backends.types import (
    Chunk,
    Done,
    EmbedRequest,
    GenerateRequest,
    Message,
    ModelDetails,
    ModelInfo,
    ModelShow,
    RunningModel,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from mlxgate.dialects import ollama as dialect
from mlxgate.dialects.base import Tool, ToolFunction, WireModel, produced_arguments, wire_error


def _body(cls: type[WireModel], /, **fields: Any) -> dict[str, Any]:
    """A request body built (and so checked) by the dialect's model; what the
    dialect cannot carry is the caller's error, named."""
    try:
        return cls(**{k: v for k, v in fields.items() if v is not None}).dump()
    except ValidationError as e:
        raise InvalidArgument(f"ollama: {wire_error(e, fields).message}") from None


def options_json(req: GenerateRequest) -> dict[str, Any]:
    """The request's sampling as Ollama options (names from the dialect's one table)."""
    s = req.sampling
    opts: dict[str, Any] = {
        option: getattr(s, field) for field, option in dialect.OPTION_OF_SAMPLING.items()
        if getattr(s, field) is not None
    }
    if s.stop:
        opts["stop"] = list(s.stop)
    return opts


def message(m: Message) -> dialect.Message:
    return dialect.Message(
        role=m.role,
        content=m.content,
        images=m.images or None,
        # Ollama wants the arguments as a JSON object, not a string.
        tool_calls=[
            dialect.ToolCall(function=dialect.ToolCallFunction(index=t.index, name=t.name, arguments=t.arguments))
            for t in m.tool_calls
        ] or None,
        tool_name=m.tool_name or None,
        thinking=m.thinking or None,
    )


def tool(t: Any) -> Tool:
    return Tool(type="function", function=ToolFunction(name=t.name, description=t.description, parameters=t.parameters))


def generate_body(req: GenerateRequest) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) for a streaming /api/chat or /api/generate call."""
    if req.tool_choice.forced:
        # Ollama's API cannot force a tool call.  Unimplemented is retryable:
        # the router moves on to a backend that can, rather than answer unforced.
        raise Unimplemented(f"ollama: tool_choice {req.tool_choice.describe()} cannot be forced through Ollama's API")
    common: dict[str, Any] = {
        "model": req.model,
        "stream": True,
        "options": options_json(req) or None,
        "format": "json" if req.format.kind == "json" else req.format.schema if req.format.kind == "json_schema"
        else None,
        "logprobs": True if req.logprobs else None,
        "top_logprobs": req.top_logprobs if req.logprobs and req.top_logprobs else None,
        "keep_alive": req.keep_alive,  # a number is read as seconds
        "think": req.think,
    }
    if req.messages is not None:
        return "/api/chat", _body(
            dialect.ChatRequest,
            messages=[message(m) for m in req.messages],
            tools=[tool(t) for t in req.tools] or None,
            **common,
        )
    p = req.prompt
    assert p is not None
    return "/api/generate", _body(
        dialect.GenerateRequest,
        prompt=p.prompt,
        suffix=p.suffix or None,
        system=p.system or None,
        raw=True if p.raw else None,
        images=list(p.images) or None,
        **common,
    )


def embed_body(req: EmbedRequest) -> dict[str, Any]:
    if req.input_tokens:
        # /api/embed takes text only, and ids made for a local model mean nothing to Ollama's.
        raise InvalidArgument("ollama: embeddings from token ids are not supported by an upstream Ollama; send text")
    return _body(
        dialect.EmbedRequest,
        model=req.model,
        input=list(req.inputs),
        truncate=req.truncate,
        dimensions=req.dimensions or None,
        keep_alive=req.keep_alive,
    )


def tool_calls_from(msg: dict) -> list[ToolCall]:
    out = []
    for i, tc in enumerate(msg.get("tool_calls") or []):
        if not isinstance(tc, dict):
            continue
        fn = tc.get("function") or {}
        index = fn.get("index", i)
        out.append(
            ToolCall(
                name=str(fn.get("name") or ""),
                arguments=produced_arguments(fn.get("arguments")),
                id=str(tc.get("id") or ""),
                index=index if isinstance(index, int) and not isinstance(index, bool) else i,
            )
        )
    return out


def logprobs_from(items: Optional[list]) -> list[TokenLogprob]:
    out = []
    for lp in items or []:
        out.append(
            TokenLogprob(
                token_id=int(lp.get("id", 0) or 0),
                token=lp.get("token", ""),
                logprob=float(lp.get("logprob", 0.0)),
                top=[
                    TopLogprob(int(t.get("id", 0) or 0), t.get("token", ""), float(t.get("logprob", 0.0)))
                    for t in lp.get("top_logprobs") or []
                ],
            )
        )
    return out


def chunk_from_line(obj: dict) -> Optional[Chunk]:
    """The text/tool calls/logprobs carried by one stream line, or None if it carries none."""
    msg = obj.get("message")
    if isinstance(msg, dict):
        text = msg.get("content") or ""
        thinking = msg.get("thinking") or ""
        calls = tool_calls_from(msg)
    else:
        text = obj.get("response") or ""
        thinking = obj.get("thinking") or ""
        calls = []
    lps = logprobs_from(obj.get("logprobs"))
    if not isinstance(thinking, str):
        thinking = ""
    if not text and not thinking and not calls and not lps:
        return None
    return Chunk(text=text, thinking=thinking, tool_calls=calls, logprobs=lps)


def done_from_line(obj: dict, backend: str, model: str, saw_tool_calls: bool) -> Done:
    reason = dialect.FINISH_OF_DONE_REASON.get(obj.get("done_reason") or "stop", "stop")
    if saw_tool_calls and reason == "stop":
        reason = "tool_calls"
    return Done(
        finish_reason=reason,  # type: ignore[arg-type]
        prompt_tokens=int(obj.get("prompt_eval_count") or 0),
        completion_tokens=int(obj.get("eval_count") or 0),
        load_duration_ns=int(obj.get("load_duration") or 0),
        prompt_eval_duration_ns=int(obj.get("prompt_eval_duration") or 0),
        eval_duration_ns=int(obj.get("eval_duration") or 0),
        total_duration_ns=int(obj.get("total_duration") or 0),
        backend=backend,
        model=obj.get("model") or model,
    )


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_time(value: Optional[str]) -> Optional[datetime]:
    """Ollama's RFC 3339 times carry nanoseconds; Python takes microseconds."""
    if not value:
        return None
    try:
        v = _FRACTION.sub(r"\1", value.replace("Z", "+00:00"))
        dt = datetime.fromisoformat(v)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    if dt.year <= 1:  # Go's zero time
        return None
    return dt


def details_from(d: Optional[dict]) -> ModelDetails:
    d = d or {}
    return ModelDetails(
        family=d.get("family") or "",
        families=list(d.get("families") or []),
        parameter_size=d.get("parameter_size") or "",
        quantization_level=d.get("quantization_level") or "",
        format=d.get("format") or "",
    )


def model_info_from(m: dict, backend: str) -> ModelInfo:
    return ModelInfo(
        name=m.get("name") or m.get("model") or "",
        backend=backend,
        size_bytes=int(m.get("size") or 0),
        digest=m.get("digest") or "",
        modified_at=parse_time(m.get("modified_at")),
        details=details_from(m.get("details")),
    )


def running_from(m: dict, backend: str) -> RunningModel:
    return RunningModel(
        name=m.get("name") or m.get("model") or "",
        backend=backend,
        size_bytes=int(m.get("size") or 0),
        expires_at=parse_time(m.get("expires_at")),
        context_length=int(m.get("context_length") or 0),
        details=details_from(m.get("details")),
    )


def show_from(name: str, data: dict, backend: str) -> ModelShow:
    info_map = data.get("model_info") or {}
    ctx = 0
    params = 0
    for k, v in info_map.items():
        if k.endswith(".context_length") and isinstance(v, int):
            ctx = v
        elif k == "general.parameter_count" and isinstance(v, int):
            params = v
    details = details_from(data.get("details"))
    details.parameter_count = params
    return ModelShow(
        info=ModelInfo(
            name=name, backend=backend, modified_at=parse_time(data.get("modified_at")), details=details
        ),
        chat_template=data.get("template") or "",
        context_length=ctx,
        capabilities=list(data.get("capabilities") or []),
        config=dict(info_map),
        license=data.get("license") or "",
    )
