"""Domain types <-> Ollama REST JSON (docs/api.md of the Ollama project).

Pure functions, no I/O, so the translation is testable on its own.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timezone
from typing import Any, Optional

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

# Sampling field -> Ollama option name (the ones whose names differ are mapped).
_OPTION_NAMES = {
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
}


def _b64(images: list[bytes]) -> list[str]:
    return [base64.b64encode(i).decode("ascii") for i in images]


def options_json(req: GenerateRequest) -> dict[str, Any]:
    s = req.sampling
    opts: dict[str, Any] = {}
    for field, name in _OPTION_NAMES.items():
        v = getattr(s, field)
        if v is not None:
            opts[name] = v
    if s.stop:
        opts["stop"] = list(s.stop)
    return opts


def message_json(m: Message) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.images:
        d["images"] = _b64(m.images)
    if m.tool_calls:
        # Ollama wants the arguments as a JSON object, not a string.
        d["tool_calls"] = [
            {"function": {"index": t.index, "name": t.name, "arguments": t.arguments}} for t in m.tool_calls
        ]
    if m.tool_name:
        d["tool_name"] = m.tool_name
    if m.thinking:
        d["thinking"] = m.thinking
    return d


def generate_body(req: GenerateRequest) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) for a streaming /api/chat or /api/generate call."""
    if req.tool_choice.forced:
        # Ollama's API cannot force a tool call.  Unimplemented is retryable:
        # the router moves on to a backend that can, rather than answer unforced.
        raise Unimplemented(f"ollama: tool_choice {req.tool_choice.describe()} cannot be forced through Ollama's API")
    body: dict[str, Any] = {"model": req.model, "stream": True}
    if req.messages is not None:
        path = "/api/chat"
        body["messages"] = [message_json(m) for m in req.messages]
        if req.tools:
            body["tools"] = [t.to_template_dict() for t in req.tools]
    else:
        path = "/api/generate"
        p = req.prompt
        assert p is not None
        body["prompt"] = p.prompt
        if p.suffix:
            body["suffix"] = p.suffix
        if p.system:
            body["system"] = p.system
        if p.raw:
            body["raw"] = True
        if p.images:
            body["images"] = _b64(p.images)
    opts = options_json(req)
    if opts:
        body["options"] = opts
    if req.format.kind == "json":
        body["format"] = "json"
    elif req.format.kind == "json_schema":
        body["format"] = req.format.schema
    if req.logprobs:
        body["logprobs"] = True
        if req.top_logprobs:
            body["top_logprobs"] = req.top_logprobs
    if req.keep_alive is not None:
        body["keep_alive"] = req.keep_alive  # a number is read as seconds
    if req.think is not None:
        body["think"] = req.think
    return path, body


def embed_body(req: EmbedRequest) -> dict[str, Any]:
    if req.input_tokens:
        # /api/embed takes text only, and ids made for a local model mean nothing to Ollama's.
        raise InvalidArgument("ollama: embeddings from token ids are not supported by an upstream Ollama; send text")
    body: dict[str, Any] = {"model": req.model, "input": list(req.inputs), "truncate": req.truncate}
    if req.dimensions:
        body["dimensions"] = req.dimensions
    if req.keep_alive is not None:
        body["keep_alive"] = req.keep_alive
    return body


def _arguments(raw: Any) -> dict:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str) and raw:
        try:
            v = json.loads(raw)
            return v if isinstance(v, dict) else {"value": v}
        except ValueError:
            return {}
    return {}


def tool_calls_from(msg: dict) -> list[ToolCall]:
    out = []
    for i, tc in enumerate(msg.get("tool_calls") or []):
        fn = tc.get("function") or {}
        out.append(
            ToolCall(
                name=fn.get("name", ""),
                arguments=_arguments(fn.get("arguments")),
                id=tc.get("id", "") or "",
                index=int(fn.get("index", i) or i),
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


_FINISH = {"stop": "stop", "length": "length", "load": "stop", "unload": "stop"}


def done_from_line(obj: dict, backend: str, model: str, saw_tool_calls: bool) -> Done:
    reason = _FINISH.get(obj.get("done_reason") or "stop", "stop")
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
