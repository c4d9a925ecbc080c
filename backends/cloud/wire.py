"""Domain types <-> OpenAI-compatible REST JSON (chat/completions, completions, embeddings).

Pure functions, no I/O.  Only the standard OpenAI request fields are sent:
top_k, min_p, repeat_penalty, repeat_last_n and num_ctx have no OpenAI
equivalent and are dropped (real OpenAI rejects unknown fields with 400).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from backends.types import Chunk, GenerateRequest, Message, TokenLogprob, ToolCall, TopLogprob


def _image_url(data: bytes) -> dict[str, Any]:
    mime = "image/png"
    if data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif data[:4] == b"GIF8":
        mime = "image/gif"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def message_json(m: Message, i: int) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role}
    if m.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
        parts += [_image_url(b) for b in m.images]
        d["content"] = parts
    else:
        d["content"] = m.content
    if m.tool_calls:
        d["tool_calls"] = [
            {
                "id": t.id or f"call_{i}_{j}",
                "type": "function",
                "function": {"name": t.name, "arguments": json.dumps(t.arguments)},
            }
            for j, t in enumerate(m.tool_calls)
        ]
        if not m.content:
            d["content"] = None
    if m.role == "tool":
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_name:
            d["name"] = m.tool_name
    return d


def _sampling(req: GenerateRequest, body: dict[str, Any]) -> None:
    s = req.sampling
    for k in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        v = getattr(s, k)
        if v is not None:
            body[k] = v
    # Unset or negative (no limit) sends none: the provider's own default, never one we invent.
    if s.max_tokens is not None and s.max_tokens >= 0:
        body["max_tokens"] = s.max_tokens
    if s.stop:
        body["stop"] = list(s.stop)


def uses_completions(req: GenerateRequest) -> bool:
    """Raw prompts go to /completions; everything else to /chat/completions."""
    return req.prompt is not None and req.prompt.raw and not req.prompt.images


def chat_messages(req: GenerateRequest) -> list[Message]:
    if req.messages is not None:
        return req.messages
    p = req.prompt
    assert p is not None
    msgs = [Message("system", p.system)] if p.system else []
    msgs.append(Message("user", p.prompt, images=list(p.images)))
    return msgs


def generate_body(req: GenerateRequest) -> tuple[str, dict[str, Any]]:
    """(path relative to base_url, JSON body) of a streaming call."""
    body: dict[str, Any] = {
        "model": req.model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _sampling(req, body)
    if uses_completions(req):
        assert req.prompt is not None
        body["prompt"] = req.prompt.prompt
        if req.prompt.suffix:
            body["suffix"] = req.prompt.suffix
        if req.logprobs:
            body["logprobs"] = max(1, req.top_logprobs)
        return "/completions", body
    body["messages"] = [message_json(m, i) for i, m in enumerate(chat_messages(req))]
    if req.tools:
        body["tools"] = [t.to_template_dict() for t in req.tools]
        if req.tool_choice.mode == "required":
            body["tool_choice"] = "required"
        elif req.tool_choice.mode == "function":
            body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.function_name}}
    if req.format.kind == "json":
        body["response_format"] = {"type": "json_object"}
    elif req.format.kind == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": req.format.schema or {}},
        }
    if req.logprobs:
        body["logprobs"] = True
        if req.top_logprobs:
            body["top_logprobs"] = req.top_logprobs
    return "/chat/completions", body


_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "stop",
}


def _reasoning(delta: dict) -> str:
    """Reasoning text of a delta: ``reasoning_content`` (DeepSeek, vLLM) or
    ``reasoning`` (mlx-lm's server, OpenRouter).  Nothing is sent upstream to
    ask for it (request fields differ per provider); models that reason
    anyway are heard."""
    for key in ("reasoning_content", "reasoning"):
        v = delta.get(key)
        if isinstance(v, str) and v:
            return v
    return ""


def finish_reason(value: Optional[str]) -> str:
    return _FINISH.get(value or "stop", "stop")


def _chat_logprobs(lp: Any) -> list[TokenLogprob]:
    if not isinstance(lp, dict):
        return []
    out = []
    for item in lp.get("content") or []:
        if not isinstance(item, dict) or "logprob" not in item:
            continue
        out.append(
            TokenLogprob(
                token_id=int(item.get("id", 0) or 0),
                token=item.get("token", "") or "",
                logprob=float(item["logprob"]),
                top=[
                    TopLogprob(int(t.get("id", 0) or 0), t.get("token", "") or "", float(t.get("logprob", 0.0)))
                    for t in item.get("top_logprobs") or []
                    if isinstance(t, dict)
                ],
            )
        )
    return out


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class StreamState:
    """Accumulates what a chat/completions SSE stream says across its events."""

    finish: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    model: str = ""
    calls: dict[int, _PendingCall] = field(default_factory=dict)
    #: Events that carried a token (text, reasoning, a tool-call delta or
    #: logprobs); role-only deltas, finish and usage events do not.  The
    #: token clocks (backends.http_upstream) run on this.
    token_events: int = 0

    def feed(self, obj: dict) -> Optional[Chunk]:
        """Take one parsed ``data:`` event; return the chunk to emit now, if any.

        Tool-call deltas are accumulated (ids and names arrive first, the
        arguments string in pieces) and emitted once, by ``tool_calls``."""
        if obj.get("model"):
            self.model = obj["model"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            if isinstance(details, dict):
                self.cached_tokens = int(details.get("cached_tokens") or 0)
        text = ""
        thinking = ""
        lps: list[TokenLogprob] = []
        call_deltas = 0
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text += delta.get("content") or ""
                thinking += _reasoning(delta)
                for tc in delta.get("tool_calls") or []:
                    call_deltas += isinstance(tc, dict)
                    self._add_call_delta(tc)
                lps += _chat_logprobs(choice.get("logprobs"))
            else:  # /completions
                text += choice.get("text") or ""
                lps += _completion_logprobs(choice.get("logprobs"))
        if text or thinking or lps or call_deltas:
            self.token_events += 1
        if text or thinking or lps:
            return Chunk(text=text, thinking=thinking, logprobs=lps)
        return None

    def _add_call_delta(self, tc: Any) -> None:
        if not isinstance(tc, dict):
            return
        idx = int(tc.get("index", len(self.calls)) or 0)
        pending = self.calls.setdefault(idx, _PendingCall())
        if tc.get("id"):
            pending.id = tc["id"]
        fn = tc.get("function") or {}
        if fn.get("name") and not pending.name:
            pending.name = fn["name"]
        args = fn.get("arguments")
        if isinstance(args, str):
            pending.arguments += args
        elif isinstance(args, dict):
            pending.arguments = json.dumps(args)

    def tool_calls(self) -> list[ToolCall]:
        out = []
        for idx in sorted(self.calls):
            p = self.calls[idx]
            out.append(ToolCall(name=p.name, arguments=parse_arguments(p.arguments), id=p.id, index=idx))
        return out


def parse_arguments(text: str) -> dict:
    if not text.strip():
        return {}
    try:
        v = json.loads(text)
    except ValueError:
        # Keep what the model said rather than dropping it.
        return {"_raw": text}
    return v if isinstance(v, dict) else {"value": v}


def _completion_logprobs(lp: Any) -> list[TokenLogprob]:
    if not isinstance(lp, dict):
        return []
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    out = []
    for i, (tok, val) in enumerate(zip(tokens, values)):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(
            TokenLogprob(
                token_id=0,
                token=str(tok),
                logprob=float(val or 0.0),
                top=[TopLogprob(0, str(k), float(v)) for k, v in top.items()],
            )
        )
    return out
