"""Translation pieces both dialects share: tools, tool-call arguments, times."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from backends.types import Chunk, Done, Event, TokenLogprob, Tool, ToolCall
from gateway.errors import bad_request
from gateway.fields import Body, item


def rfc3339(dt: Optional[datetime] = None) -> str:
    """UTC, fractional seconds, 'Z' (the shape Ollama's created_at has)."""
    dt = (dt or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_tools(values: Optional[list[Any]], name: str = "tools") -> list[Tool]:
    """``[{"type": "function", "function": {name, description, parameters}}]`` (same in both dialects)."""
    tools: list[Tool] = []
    for i, v in enumerate(values or []):
        t = item(v, f"{name}[{i}]")
        kind = t.str("type", "function")
        if kind != "function":
            raise bad_request(f"{t.name('type')}: only 'function' tools are supported, got {kind!r}")
        fn = t.obj("function")
        if fn is None:
            raise bad_request(f"{t.name('function')} is required", param=t.name("function"))
        params = fn.obj("parameters")
        tools.append(
            Tool(
                name=fn.str("name", required=True) or "",
                description=fn.str("description", "") or "",
                parameters=params.data if params is not None else {},
            )
        )
        fn.ignore("strict")
        fn.log_unknown("tools")
        t.log_unknown("tools")
    return tools


def parse_arguments(v: Any, name: str) -> dict:
    """Tool-call arguments: a JSON object, or JSON text of one (OpenAI sends text)."""
    if v is None or v == "":
        return {}
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise bad_request(f"{name} is not valid JSON", param=name) from None
    if not isinstance(v, dict):
        raise bad_request(f"{name} must be a JSON object", param=name)
    return v


def require_model(body: Body) -> str:
    return body.str("model", required=True) or ""


@dataclass
class Collected:
    """A whole generation, gathered for a non-streaming answer."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: Done = field(default_factory=Done)
    thinking: str = ""


def collect(events: list[Event]) -> Collected:
    out = Collected()
    parts: list[str] = []
    thoughts: list[str] = []
    for ev in events:
        if isinstance(ev, Chunk):
            parts.append(ev.text)
            thoughts.append(ev.thinking)
            out.tool_calls.extend(ev.tool_calls)
            out.logprobs.extend(ev.logprobs)
        else:
            out.done = ev
    out.text = "".join(parts)
    out.thinking = "".join(thoughts)
    return out
