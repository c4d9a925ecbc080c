"""Domain types <-> OpenAI-compatible REST JSON (chat/completions, completions,
embeddings), through the one declaration of the dialect
(``mlxgate/dialects/openai.py``) that the HTTP front uses too.

Requests are built as the dialect's request models and dumped; only the
standard OpenAI request fields are sent: top_k, min_p, repeat_penalty,
repeat_last_n and num_ctx have no OpenAI equivalent and are dropped (real
OpenAI rejects unknown fields with 400), and a value OpenAI's ranges refuse
(temperature above 2) is INVALID_ARGUMENT here rather than a 400 from the
provider.  Answers are read against the dialect's response shapes, with its
finish-reason map and the rule for tool-call arguments an upstream produced
(``mlxgate.dialects.base.produced_arguments``).  Pure functions, no I/O.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError

from backends.errors import InvalidArgument, Unavailable
from backends.types import Chunk, GenerateRequest, Message, RerankRequest, TokenLogprob, ToolCall, TopLogprob
from mlxgate import jsonutil
from mlxgate.dialects import openai as dialect
from mlxgate.dialects import rerank as rerank_dialect
from mlxgate.dialects.base import Tool, ToolFunction, WireModel, produced_arguments, wire_error


def _body(cls: type[WireModel], who: str, /, **fields: Any) -> dict[str, Any]:
    try:
        return cls(**{k: v for k, v in fields.items() if v is not None}).dump()
    except ValidationError as e:
        raise InvalidArgument(f"{who}: {wire_error(e, fields).message}") from None


def _image_url(data: bytes, detail: str) -> dialect.ImagePart:
    mime = "image/png"
    if data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    elif data[:4] == b"GIF8":
        mime = "image/gif"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return dialect.ImagePart(type="image_url",
                             image_url=dialect.ImageURL(url=url, detail=None if detail == "auto" else detail))


def message(m: Message, i: int) -> dialect.ChatMessage:
    content: Any = m.content
    if m.images:
        parts: list[Any] = [dialect.TextPart(type="text", text=m.content)] if m.content else []
        content = parts + [_image_url(b, d) for b, d in zip(m.images, m.details())]
    calls = [
        dialect.ToolCall(
            id=t.id or f"call_{i}_{j}",
            type="function",
            function=dialect.ToolCallFunction(name=t.name, arguments=t.arguments),
        )
        for j, t in enumerate(m.tool_calls)
    ]
    if calls and not m.content:
        content = None
    return dialect.ChatMessage(
        role=m.role,
        content=content,
        tool_calls=calls or None,
        tool_call_id=(m.tool_call_id or None) if m.role == "tool" else None,
        name=(m.tool_name or None) if m.role == "tool" else None,
    )


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


def _sampling(req: GenerateRequest) -> dict[str, Any]:
    s = req.sampling
    out = {k: getattr(s, k) for k in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")}
    # Unset or negative (no limit) sends none: the provider's own default, never one we invent.
    out["max_tokens"] = s.max_tokens if s.max_tokens is not None and s.max_tokens >= 0 else None
    out["stop"] = list(s.stop) or None
    return out


def generate_body(req: GenerateRequest, who: str = "cloud") -> tuple[str, dict[str, Any]]:
    """(path relative to base_url, JSON body) of a streaming call."""
    common: dict[str, Any] = {
        "model": req.model,
        "stream": True,
        "stream_options": dialect.StreamOptions(include_usage=True),
        **_sampling(req),
    }
    if uses_completions(req):
        assert req.prompt is not None
        return "/completions", _body(
            dialect.CompletionRequest, who,
            prompt=req.prompt.prompt,
            suffix=req.prompt.suffix or None,
            logprobs=max(1, req.top_logprobs) if req.logprobs else None,
            **common,
        )
    tool_choice: Any = None
    if req.tools and req.tool_choice.mode == "required":
        tool_choice = "required"
    elif req.tools and req.tool_choice.mode == "function":
        tool_choice = dialect.ToolChoiceFunction(
            type="function", function=dialect.NamedFunction(name=req.tool_choice.function_name))
    response_format = None
    if req.format.kind == "json":
        response_format = dialect.ResponseFormat(type="json_object")
    elif req.format.kind == "json_schema":
        response_format = dialect.ResponseFormat(
            type="json_schema",
            json_schema=dialect.JSONSchemaFormat(name="response", schema=req.format.schema or {}),
        )
    return "/chat/completions", _body(
        dialect.ChatCompletionRequest, who,
        messages=[message(m, i) for i, m in enumerate(chat_messages(req))],
        tools=[
            Tool(type="function", function=ToolFunction(name=t.name, description=t.description,
                                                        parameters=t.parameters))
            for t in req.tools
        ] or None,
        tool_choice=tool_choice,
        response_format=response_format,
        logprobs=True if req.logprobs else None,
        top_logprobs=req.top_logprobs if req.logprobs and req.top_logprobs else None,
        **common,
    )


def embed_body(model: str, inputs: list[str], dimensions: int, who: str = "cloud") -> dict[str, Any]:
    return _body(dialect.EmbeddingsRequest, who, model=model, input=inputs, dimensions=dimensions or None)


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
    return dialect.FINISH_OF_UPSTREAM.get(value or "stop", "stop")


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

    #: What ``add`` gathered since the last ``take``.
    _text: list[str] = field(default_factory=list)
    _thinking: list[str] = field(default_factory=list)
    _logprobs: list[TokenLogprob] = field(default_factory=list)

    def feed(self, obj: dict) -> Optional[Chunk]:
        """Take one parsed ``data:`` event; return the chunk to emit now, if any."""
        self.add(obj)
        return self.take()

    def add(self, obj: dict) -> None:
        """Take one parsed ``data:`` event; its text, reasoning and logprobs
        wait for ``take`` (so the events of one network read make one chunk).

        Tool-call deltas are accumulated (ids and names arrive first, the
        arguments string in pieces) and emitted once, by ``tool_calls``."""
        model = obj.get("model")
        if model:
            self.model = model
        usage = obj.get("usage")
        if usage is not None and isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            if isinstance(details, dict):
                self.cached_tokens = int(details.get("cached_tokens") or 0)
        choices = obj.get("choices")
        if not choices:
            return
        token = False
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            finish = choice.get("finish_reason")
            if finish:
                self.finish = finish
            delta = choice.get("delta")
            logprobs = choice.get("logprobs")
            if isinstance(delta, dict):
                text = delta.get("content")
                if text:
                    self._text.append(text)
                    token = True
                if logprobs is None and len(delta) == 1 and text is not None:
                    continue  # the usual event: text alone (no reasoning, tool calls nor logprobs to look for)
                thinking = _reasoning(delta)
                if thinking:
                    self._thinking.append(thinking)
                    token = True
                calls = delta.get("tool_calls")
                if calls:
                    for tc in calls:
                        token = token or isinstance(tc, dict)
                        self._add_call_delta(tc)
                if logprobs is not None:
                    lps = _chat_logprobs(logprobs)
                    if lps:
                        self._logprobs += lps
                        token = True
            else:  # /completions
                text = choice.get("text")
                if text:
                    self._text.append(text)
                    token = True
                if logprobs is not None:
                    lps = _completion_logprobs(logprobs)
                    if lps:
                        self._logprobs += lps
                        token = True
        if token:
            self.token_events += 1

    def take(self) -> Optional[Chunk]:
        """One chunk of everything ``add`` gathered since the last take (None: nothing)."""
        if not (self._text or self._thinking or self._logprobs):
            return None
        chunk = Chunk(text="".join(self._text), thinking="".join(self._thinking), logprobs=self._logprobs)
        self._text, self._thinking, self._logprobs = [], [], []
        return chunk

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
            pending.arguments = jsonutil.dumps(args)

    def tool_calls(self) -> list[ToolCall]:
        out = []
        for idx in sorted(self.calls):
            p = self.calls[idx]
            out.append(ToolCall(name=p.name, arguments=produced_arguments(p.arguments), id=p.id, index=idx))
        return out


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


# ---------------------------------------------------------------- rerank


def rerank_body(req: RerankRequest, who: str) -> dict[str, Any]:
    """A ``/rerank`` request in the Jina / Cohere shape (vLLM, Jina, Cohere's v1);
    the judging instruction is the MLX engine's and is not sent."""
    return _body(rerank_dialect.RerankRequest, who, model=req.model, query=req.query, documents=req.documents,
                 top_n=req.top_n or None, return_documents=False)


def rerank_result(data: Any, n_documents: int, who: str) -> list[tuple[int, float]]:
    """(index, score) pairs of a ``/rerank`` answer, best first; a result that
    names no document of the request is the upstream's fault (Unavailable)."""
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise Unavailable(f"{who}: the /rerank answer has no results list")
    out = []
    for r in results:
        index = r.get("index") if isinstance(r, dict) else None
        score = r.get("relevance_score") if isinstance(r, dict) else None
        if (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n_documents
                or not isinstance(score, (int, float)) or isinstance(score, bool)):
            raise Unavailable(f"{who}: the /rerank answer has a malformed result: {str(r)[:200]}")
        out.append((index, float(score)))
    out.sort(key=lambda p: -p[1])
    return out
