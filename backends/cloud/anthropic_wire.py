"""Domain types <-> Anthropic's Messages API (``/v1/messages``,
``/v1/messages/count_tokens``, ``/v1/models``), through the one declaration of
the dialect (``mlxgate/dialects/anthropic.py``) that the HTTP front parses
with.  Pure functions and a stream parser; no I/O.

Requests are built as the dialect's request models and dumped, so a field, a
block type or a base64 image travels exactly as the front reads it, and a
value Anthropic's rules refuse (temperature above 1) is INVALID_ARGUMENT here
rather than a 400 from the provider.  How the contract maps onto them:

- system messages (anywhere) are the top-level ``system``, joined by blank
  lines; a raw prompt is sent as one user turn (Anthropic has no completions
  API) and a suffix (fill-in-the-middle) is UNIMPLEMENTED;
- a tool message is a ``tool_result`` block in a user turn (its call's id, or
  the id of the latest call of that tool name); consecutive turns of the same
  role are merged into one, as Anthropic wants turns to alternate;
- an assistant's reasoning in history is not sent: Anthropic accepts
  thinking blocks only with its own signature, which the contract does not
  carry (so a tool loop with thinking enabled may be refused by Anthropic);
- ``max_tokens`` is required by Anthropic: a request without a limit (or
  with "no limit") gets ``DEFAULT_MAX_TOKENS``;
- ``think`` true enables thinking with a budget of half of ``max_tokens``
  (at least 1,024, Anthropic's minimum; when ``max_tokens`` leaves no room for
  that, thinking is not enabled); false disables it; unset sends nothing;
- a JSON format is ``output_config.format`` (any object: ``{"type":
  "object"}``); forced tool choices are ``any`` / ``tool``;
- presence/frequency/repeat penalties, min_p, seed and logprobs have no
  Anthropic equivalent and are not sent.

Answers: ``StreamState`` reads the SSE events (``message_start``,
``content_block_*``, ``message_delta``, ``message_stop``, ``ping``; ``error`` is
the caller's to raise) into Chunks and the final counts; a ``tool_use``
block's input is accumulated from its ``input_json_delta`` pieces and
emitted as one call when the block stops (the rule for arguments an
upstream produced: kept even when they do not parse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError

from backends.errors import InvalidArgument, Unimplemented
from backends.types import Chunk, GenerateRequest, Message, ToolCall
from mlxgate import jsonutil
from mlxgate.dialects import anthropic as dialect
from mlxgate.dialects.base import WireModel, produced_arguments, wire_error

#: max_tokens sent when the request sets no limit (Anthropic requires one).
DEFAULT_MAX_TOKENS = 4096
#: Anthropic's smallest thinking budget.
MIN_THINKING_BUDGET = 1024


def _body(cls: type[WireModel], who: str, /, **fields: Any) -> dict[str, Any]:
    try:
        return cls(**{k: v for k, v in fields.items() if v is not None}).dump()
    except ValidationError as e:
        raise InvalidArgument(f"{who}: {wire_error(e, fields).message}") from None


def media_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"GIF8":
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def _image(data: bytes) -> dialect.ImageBlock:
    return dialect.ImageBlock(
        type="image", source=dialect.Base64ImageSource(type="base64", media_type=media_type(data), data=data))


def _text(text: str) -> dialect.TextBlock:
    return dialect.TextBlock(type="text", text=text)


def _chat(req: GenerateRequest, who: str) -> list[Message]:
    if req.messages is not None:
        return req.messages
    p = req.prompt
    assert p is not None
    if p.suffix:
        raise Unimplemented(f"{who}: a suffix (fill-in-the-middle) cannot be sent to Anthropic's Messages API")
    msgs = [Message("system", p.system)] if p.system else []
    msgs.append(Message("user", p.prompt, images=list(p.images)))
    return msgs


def _turns(messages: list[Message]) -> tuple[str, list[dialect.MessageParam]]:
    """(system text, alternating user/assistant turns)."""
    system: list[str] = []
    turns: list[tuple[str, list[Any]]] = []
    call_ids: dict[str, str] = {}  # tool name -> id of its latest call

    def add(role: str, blocks: list[Any]) -> None:
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))

    for i, m in enumerate(messages):
        if m.role == "system":
            if m.content:
                system.append(m.content)
            continue
        blocks: list[Any] = []
        if m.role == "tool":
            tool_use_id = m.tool_call_id or call_ids.get(m.tool_name, "") or f"toolu_{i}"
            content: Any = m.content
            if m.images:
                content = ([_text(m.content)] if m.content else []) + [_image(b) for b in m.images]
            blocks.append(dialect.ToolResultBlock(type="tool_result", tool_use_id=tool_use_id, content=content))
            add("user", blocks)
            continue
        if m.content:
            blocks.append(_text(m.content))
        blocks += [_image(b) for b in m.images]
        for j, call in enumerate(m.tool_calls):
            call_id = call.id or f"toolu_{i}_{j}"
            call_ids[call.name] = call_id
            blocks.append(dialect.ToolUseBlock(type="tool_use", id=call_id, name=call.name, input=call.arguments))
        if not blocks:
            blocks.append(_text(m.content))
        add(m.role, blocks)
    params = [dialect.MessageParam(role=role, content=blocks) for role, blocks in turns]  # type: ignore[arg-type]
    return "\n\n".join(system), params


def _input_fields(req: GenerateRequest, who: str, max_tokens: Optional[int]) -> dict[str, Any]:
    """What a message and a token count share: model, system, turns, tools, choice, thinking, format."""
    system, turns = _turns(_chat(req, who))
    tools = [
        dialect.ToolParam(name=t.name, description=t.description or None,
                          input_schema=t.parameters or {"type": "object", "properties": {}})
        for t in req.tools
    ]
    choice: Any = None
    if tools and req.tool_choice.mode == "required":
        choice = dialect.ToolChoiceAny(type="any")
    elif tools and req.tool_choice.mode == "function":
        choice = dialect.ToolChoiceTool(type="tool", name=req.tool_choice.function_name)
    thinking: Any = None
    if req.think is False:
        thinking = dialect.ThinkingDisabled(type="disabled")
    elif req.think:
        limit = max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS
        budget = max(MIN_THINKING_BUDGET, limit // 2)
        if budget < limit:
            thinking = dialect.ThinkingEnabled(type="enabled", budget_tokens=budget)
    output_config = None
    if req.format.kind != "text":
        schema = req.format.schema if req.format.kind == "json_schema" else None
        output_config = dialect.OutputConfig(format=dialect.JSONOutputFormat(
            type="json_schema", schema=schema or {"type": "object"}))
    return {
        "model": req.model,
        "messages": turns,
        "system": system or None,
        "tools": tools or None,
        "tool_choice": choice,
        "thinking": thinking,
        "output_config": output_config,
    }


def max_tokens_of(req: GenerateRequest) -> int:
    m = req.sampling.max_tokens
    return m if m is not None and m >= 0 else DEFAULT_MAX_TOKENS


def messages_body(req: GenerateRequest, who: str = "anthropic") -> dict[str, Any]:
    """The JSON body of a streamed POST /v1/messages."""
    s = req.sampling
    max_tokens = max_tokens_of(req)
    return _body(
        dialect.MessagesRequest, who,
        **_input_fields(req, who, max_tokens),
        max_tokens=max_tokens,
        stop_sequences=list(s.stop) or None,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stream=True,
    )


def count_tokens_body(req: GenerateRequest, who: str = "anthropic") -> dict[str, Any]:
    """The JSON body of POST /v1/messages/count_tokens."""
    return _body(dialect.CountTokensRequest, who, **_input_fields(req, who, max_tokens_of(req)))


def model_ids(data: Any) -> tuple[list[str], Optional[str]]:
    """(model ids, the id to list after when there are more) of a GET /v1/models page."""
    if not isinstance(data, dict):
        return [], None
    ids = [m["id"] for m in data.get("data") or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    last = data.get("last_id")
    more = data.get("has_more") is True and isinstance(last, str) and last
    return ids, last if more else None


def finish_reason(stop_reason: Optional[str]) -> str:
    return dialect.FINISH_OF_STOP_REASON.get(stop_reason or "end_turn", "stop")


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


@dataclass
class _ToolBlock:
    id: str
    name: str
    input: Any
    json: list[str] = field(default_factory=list)


@dataclass
class StreamState:
    """Accumulates what a Messages SSE stream says across its events."""

    stop_reason: Optional[str] = None
    stop_sequence: str = ""
    input_tokens: int = 0
    cache_read: int = 0
    cache_creation: int = 0
    output_tokens: int = 0
    model: str = ""
    calls: int = 0
    stopped: bool = False
    #: Events that carried a token (text, thinking or a piece of a call's input);
    #: pings, starts, stops, signatures and usage do not.  The token clocks
    #: (backends.http_upstream) run on this.
    token_events: int = 0
    _tools: dict[int, _ToolBlock] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read + self.cache_creation

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        if "input_tokens" in usage:
            self.input_tokens = _int(usage["input_tokens"])
        if "cache_read_input_tokens" in usage:
            self.cache_read = _int(usage["cache_read_input_tokens"])
        if "cache_creation_input_tokens" in usage:
            self.cache_creation = _int(usage["cache_creation_input_tokens"])
        if "output_tokens" in usage:
            self.output_tokens = _int(usage["output_tokens"])

    def feed(self, obj: dict) -> Optional[Chunk]:
        """Take one event's data; return the chunk to emit now, if any."""
        kind = obj.get("type")
        if kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                self.model = msg.get("model") if isinstance(msg.get("model"), str) else self.model
                self._usage(msg.get("usage"))
            return None
        if kind == "content_block_start":
            block = obj.get("content_block")
            index = obj.get("index")
            if not isinstance(block, dict):
                return None
            if block.get("type") == "tool_use" and isinstance(index, int):
                self._tools[index] = _ToolBlock(str(block.get("id") or ""), str(block.get("name") or ""),
                                                block.get("input"))
                return None
            # A block may start with text already in it (Anthropic's start empty).
            return self._piece(block.get("text") if block.get("type") == "text" else None,
                               block.get("thinking") if block.get("type") == "thinking" else None)
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if not isinstance(delta, dict):
                return None
            dtype = delta.get("type")
            if dtype == "text_delta":
                return self._piece(delta.get("text"), None)
            if dtype == "thinking_delta":
                return self._piece(None, delta.get("thinking"))
            if dtype == "input_json_delta":
                tool = self._tools.get(obj.get("index"))  # type: ignore[arg-type]
                piece = delta.get("partial_json")
                if tool is not None and isinstance(piece, str) and piece:
                    tool.json.append(piece)
                    self.token_events += 1
            return None  # signature_delta, citations_delta: nothing to pass on
        if kind == "content_block_stop":
            tool = self._tools.pop(obj.get("index"), None)  # type: ignore[arg-type]
            if tool is None:
                return None
            raw = "".join(tool.json)
            arguments = produced_arguments(raw) if raw else produced_arguments(tool.input)
            call = ToolCall(name=tool.name, arguments=arguments, id=tool.id, index=self.calls)
            self.calls += 1
            return Chunk(tool_calls=[call])
        if kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("stop_reason"), str):
                    self.stop_reason = delta["stop_reason"]
                if isinstance(delta.get("stop_sequence"), str):
                    self.stop_sequence = delta["stop_sequence"]
            self._usage(obj.get("usage"))
            return None
        if kind == "message_stop":
            self.stopped = True
        return None  # ping, and event types added later

    def _piece(self, text: Any, thinking: Any) -> Optional[Chunk]:
        text = text if isinstance(text, str) else ""
        thinking = thinking if isinstance(thinking, str) else ""
        if not text and not thinking:
            return None
        self.token_events += 1
        return Chunk(text=text, thinking=thinking)

    def unfinished_calls(self) -> list[ToolCall]:
        """Calls whose block never stopped (the stream was cut): kept, raw."""
        out = []
        for tool in self._tools.values():
            raw = "".join(tool.json)
            out.append(ToolCall(name=tool.name, arguments=produced_arguments(raw) if raw else {}, id=tool.id,
                                index=self.calls))
            self.calls += 1
        self._tools.clear()
        return out

    def finish(self) -> str:
        reason = finish_reason(self.stop_reason)
        if self.calls and reason == "stop":
            reason = "tool_calls"
        return reason


def error_of_event(obj: dict) -> tuple[int, str]:
    """(HTTP status, message) of an ``error`` event (which has no status of its own)."""
    err = obj.get("error")
    if not isinstance(err, dict):
        return 500, jsonutil.dumps(obj)[:500]
    status = dialect.STATUS_OF_ERROR_TYPE.get(str(err.get("type")), 500)
    message = err.get("message")
    return status, message if isinstance(message, str) else str(err.get("type"))
