"""Anthropic Messages <-> proto.  Requests in, responses out; no I/O here.

The wire format is declared once, in ``mlxgate/dialects/anthropic.py``; this
module maps it onto the contract.  A request becomes one
``pb.GenerateRequest`` (the count_tokens route sends the same request to
``CountTokens``):

- ``system`` (a string, or text blocks joined by blank lines) is the first,
  system message, and system-role messages (newer clients send them inside
  ``messages``) are added to it, since most chat templates take a system
  message only first; the other ``messages`` keep their order.  Within a message, text
  blocks are joined as they are (as OpenAI's text parts); a user message's
  ``tool_result`` blocks become tool messages (the call's id and name) before
  the rest of it; an assistant's ``tool_use`` blocks are its tool calls and its
  ``thinking`` blocks its reasoning; ``redacted_thinking`` is dropped.
- images: base64 sources only; a URL is not fetched and a file source needs
  the Files API: both are 400, naming the block.
- ``tools`` are client tools; ``tool_choice`` "any" forces one call ("required"),
  "tool" keeps only the named tool and forces it, "none" drops the tools.
- ``thinking`` enabled (or between_tools) asks for thinking, disabled for none,
  adaptive or absent leaves it to the model; ``output_config.format`` is a JSON
  schema the answer must match.

Answers: ``MessageStream`` turns the proto events into Anthropic's stream
events, and the very same state machine builds the non-streamed ``Message``
(so a client's stream accumulator rebuilds exactly the whole answer).  Blocks
open and close as the kind of output changes: thinking, text, one
``tool_use`` block per call (its input sent whole, as one ``input_json_delta``).
Thinking blocks carry an empty ``signature``: nothing here can sign.
``message_start`` cannot know the prompt's size yet (the engine reports it at
the end), so its usage says 0 and ``message_delta`` carries the counts (the
SDKs take them from there).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional, Union

from gateway.errors import bad_request
from gateway.events import check_done, finish_of
from gateway.images import NOT_FETCHED
from gateway.parsing import parse
from gateway.times import rfc3339
from gateway.tools import choose_tools, text_format
from mlxgate import jsonutil, limits
from mlxgate.dialects import anthropic as wire
from mlxgate.dialects.base import produced_arguments
from mlxgate.v1 import inference_pb2 as pb

_ROLE = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}


def new_id(prefix: str) -> str:
    """Anthropic's ids: "msg_..." for messages, "toolu_..." for tool calls."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------- requests


@dataclass
class Parsed:
    model: str
    req: pb.GenerateRequest
    stream: bool


def _image(block: wire.ImageBlock, where: str) -> bytes:
    src = block.source
    if isinstance(src, wire.URLImageSource):
        raise bad_request(f"{where}.source: {NOT_FETCHED}", param=f"{where}.source")
    if isinstance(src, wire.FileImageSource):
        raise bad_request(f"{where}.source: file sources need the Files API, which this server does not serve; "
                          "send the image as a base64 source", param=f"{where}.source")
    return src.data


def _tool_result(block: wire.ToolResultBlock, where: str) -> tuple[str, list[bytes]]:
    if block.content is None:
        return "", []
    if isinstance(block.content, str):
        return block.content, []
    texts: list[str] = []
    images: list[bytes] = []
    for k, part in enumerate(block.content):
        if isinstance(part, wire.TextBlock):
            texts.append(part.text)
        else:
            images.append(_image(part, f"{where}.content[{k}]"))
    return "".join(texts), images


def _refuse_block(role: str, block_type: str, where: str, belongs: str) -> None:
    raise bad_request(f"{where}: {block_type} blocks belong to {belongs} messages, not {role}", param=f"{where}.type")


def _system_text(system: Optional[Union[str, list[wire.TextBlock]]]) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "\n\n".join(b.text for b in system)


def _system_messages(r: wire._Input) -> str:
    """``system``, then the text of every system-role message (Claude Code sends
    one after the first user turn), joined by blank lines: most chat templates
    take a system message only first, so all of it goes there."""
    parts = [_system_text(r.system)]
    for i, m in enumerate(r.messages):
        if m.role != "system":
            continue
        if isinstance(m.content, str):
            parts.append(m.content)
            continue
        for j, b in enumerate(m.content):
            if not isinstance(b, wire.TextBlock):
                raise bad_request(f"messages[{i}].content[{j}]: system messages hold text blocks only",
                                  param=f"messages[{i}].content[{j}].type")
        parts.append("".join(b.text for b in m.content))  # type: ignore[union-attr]
    return "\n\n".join(p for p in parts if p)


def messages_pb(r: wire._Input) -> list[pb.ChatMessage]:
    out: list[pb.ChatMessage] = []
    system = _system_messages(r)
    if system:
        out.append(pb.ChatMessage(role=pb.ROLE_SYSTEM, content=system))
    names_by_id: dict[str, str] = {}
    for i, m in enumerate(r.messages):
        if m.role == "system":
            continue  # in the system prompt
        if isinstance(m.content, str):
            out.append(pb.ChatMessage(role=_ROLE[m.role], content=m.content))
            continue
        texts: list[str] = []
        images: list[bytes] = []
        calls: list[pb.ToolCall] = []
        thoughts: list[str] = []
        results: list[pb.ChatMessage] = []
        for j, b in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(b, wire.TextBlock):
                texts.append(b.text)
            elif isinstance(b, wire.ImageBlock):
                if m.role != "user":
                    _refuse_block(m.role, "image", where, "user")
                images.append(_image(b, where))
            elif isinstance(b, wire.ToolUseBlock):
                if m.role != "assistant":
                    _refuse_block(m.role, "tool_use", where, "assistant")
                calls.append(pb.ToolCall(id=b.id, name=b.name, arguments_json=jsonutil.dumps(b.input),
                                         index=len(calls)))
                names_by_id[b.id] = b.name
            elif isinstance(b, wire.ToolResultBlock):
                if m.role != "user":
                    _refuse_block(m.role, "tool_result", where, "user")
                text, result_images = _tool_result(b, where)
                results.append(pb.ChatMessage(
                    role=pb.ROLE_TOOL, content=text, images=result_images, tool_call_id=b.tool_use_id,
                    tool_name=names_by_id.get(b.tool_use_id, ""),
                ))
            elif isinstance(b, wire.ThinkingBlock):
                if m.role != "assistant":
                    _refuse_block(m.role, "thinking", where, "assistant")
                thoughts.append(b.thinking)
            # redacted_thinking: another server's encrypted reasoning, dropped.
        # Tool results answer the calls before them: they come first, then what the user added.
        out.extend(results)
        if texts or images or calls or thoughts or not results:
            out.append(pb.ChatMessage(
                role=_ROLE[m.role], content="".join(texts), images=images, tool_calls=calls,
                thinking="".join(thoughts),
            ))
    return out


def _tools(r: wire._Input) -> tuple[list[pb.Tool], Optional[pb.ToolChoice]]:
    tc = r.tool_choice
    if tc is None or isinstance(tc, wire.ToolChoiceAuto):
        mode, name = "auto", ""
    elif isinstance(tc, wire.ToolChoiceNone):
        mode, name = "none", ""
    elif isinstance(tc, wire.ToolChoiceAny):
        mode, name = "required", ""
    else:
        mode, name = "function", tc.name
    tools, choice = choose_tools(list(r.tools or ()), lambda t: t.name, mode, name,
                                 required="any", name_param="tool_choice.name")
    out = [pb.Tool(name=t.name, description=t.description or "", parameters_json=jsonutil.dumps(t.input_schema))
           for t in tools]
    return out, choice


def _think(thinking: Optional[Any]) -> Optional[bool]:
    if isinstance(thinking, (wire.ThinkingEnabled, wire.ThinkingBetweenTools)):
        return True
    if isinstance(thinking, wire.ThinkingDisabled):
        return False
    return None  # adaptive, or absent: the model's default


def _generate_request(r: wire._Input) -> pb.GenerateRequest:
    if r.mcp_servers:
        raise bad_request("mcp_servers: the MCP connector is not supported by this server", param="mcp_servers")
    tools, choice = _tools(r)
    req = pb.GenerateRequest(model=r.model, tools=tools)
    req.chat.messages.extend(messages_pb(r))
    if choice is not None:
        req.tool_choice.CopyFrom(choice)
    fmt = r.output_config.format if r.output_config is not None else None
    if fmt is not None:
        req.format.CopyFrom(text_format(
            pb.OutputFormat(type=pb.FORMAT_TYPE_JSON_SCHEMA, json_schema=jsonutil.dumps(fmt.schema_)), choice))
    think = _think(r.thinking)
    if think is not None:
        req.think = think
    return req


def messages_request(data: dict[str, Any]) -> Parsed:
    r = parse(wire.MessagesRequest, data, "/v1/messages")
    req = _generate_request(r)
    s = req.sampling
    s.max_tokens = r.max_tokens
    s.stop.extend(r.stop_sequences or ())
    for name in ("temperature", "top_p", "top_k"):
        v = getattr(r, name)
        if v is not None:
            setattr(s, name, v)
    return Parsed(r.model, req, bool(r.stream))


def count_tokens_request(data: dict[str, Any]) -> pb.GenerateRequest:
    return _generate_request(parse(wire.CountTokensRequest, data, "/v1/messages/count_tokens"))


def tokens_count(res: pb.CountTokensResponse) -> wire.MessageTokensCount:
    return {"input_tokens": res.input_tokens}


# ---------------------------------------------------------------- models


def model_info(m: pb.ModelInfo, name: Optional[str] = None) -> wire.ModelInfo:
    """A model as Anthropic lists it; ``name``: the id it was asked by."""
    when = m.modified_at.ToDatetime(tzinfo=timezone.utc) if m.HasField("modified_at") else _EPOCH
    return {"type": "model", "id": name or m.name, "display_name": name or m.name, "created_at": rfc3339(when)}


_EPOCH = datetime.fromtimestamp(0, timezone.utc)


def _position(models: list[pb.ModelInfo], model_id: str, param: str) -> int:
    for i, m in enumerate(models):
        if m.name == model_id:
            return i
    raise bad_request(f"{param}: no model '{limits.clip_name(model_id)}' in the list", param=param)


def models_page(models: list[pb.ModelInfo], q: wire.ListModelsQuery) -> wire.ModelList:
    """One page of the list, as Anthropic pages it: ``after_id`` pages
    forward from a model, ``before_id`` backward; ``has_more`` says whether
    there is more in the direction of paging."""
    limit = q.limit or wire.MODELS_LIMIT_DEFAULT
    if q.before_id is not None:
        end = _position(models, q.before_id, "before_id")
        start = max(0, end - limit)
        page, has_more = models[start:end], start > 0
    else:
        start = _position(models, q.after_id, "after_id") + 1 if q.after_id is not None else 0
        page, has_more = models[start:start + limit], start + limit < len(models)
    data = [model_info(m) for m in page]
    return {"data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


# ---------------------------------------------------------------- answers


def stop_reason(done: pb.Done, had_tool_calls: bool) -> tuple[wire.StopReason, Optional[str]]:
    """(stop_reason, stop_sequence).  "tool_use" when the answer has calls, unless
    it was cut ("max_tokens": a client never runs a call whose input was cut)."""
    check_done(done)
    finish = finish_of(done)
    if had_tool_calls and finish != "length":
        return "tool_use", None
    if finish == "stop" and done.stop_sequence:
        return "stop_sequence", done.stop_sequence
    return wire.STOP_REASON.get(finish, "end_turn"), None  # type: ignore[return-value]


def usage(done: Optional[pb.Done]) -> wire.Usage:
    if done is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    cached = done.cached_prompt_tokens
    return {
        "input_tokens": max(0, done.prompt_tokens - cached),
        "output_tokens": done.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _tool_input(arguments_json: str) -> dict[str, Any]:
    # The service wrote JSON text of an object; anything else is kept, never dropped.
    return produced_arguments(arguments_json)


class MessageStream:
    """The proto events of one generation -> Anthropic's stream events, while
    building the whole ``Message`` (``message()``) from the same events."""

    def __init__(self, model: str) -> None:
        self.id = new_id("msg")
        self.model = model
        self.content: list[dict[str, Any]] = []
        self._open: Optional[str] = None  # "text" or "thinking": the block being written
        self._calls = 0
        self.stop: tuple[Optional[str], Optional[str]] = (None, None)
        self.done: Optional[pb.Done] = None

    def _skeleton(self) -> wire.AnthropicMessage:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(None),
        }

    def start(self) -> list[dict[str, Any]]:
        """``message_start``, then a ``ping`` (as Anthropic's streams begin)."""
        return [{"type": "message_start", "message": self._skeleton()}, {"type": "ping"}]

    def _close(self, out: list[dict[str, Any]]) -> None:
        if self._open is not None:
            out.append({"type": "content_block_stop", "index": len(self.content) - 1})
            self._open = None

    def _block(self, out: list[dict[str, Any]], block: dict[str, Any]) -> int:
        self._close(out)
        self.content.append(block)
        index = len(self.content) - 1
        # The start event carries the block as it begins (empty text / thinking / input).
        out.append({"type": "content_block_start", "index": index, "content_block": dict(block)})
        return index

    def _write(self, out: list[dict[str, Any]], kind: str, piece: str) -> None:
        if self._open != kind:
            start: dict[str, Any] = {"type": "text", "text": ""} if kind == "text" else \
                {"type": "thinking", "thinking": "", "signature": ""}
            self._block(out, start)
            self._open = kind
        index = len(self.content) - 1
        self.content[index][kind] += piece
        delta = {"type": "text_delta", "text": piece} if kind == "text" else \
            {"type": "thinking_delta", "thinking": piece}
        out.append({"type": "content_block_delta", "index": index, "delta": delta})

    def render(self, ev: pb.GenerateResponse) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if ev.WhichOneof("event") == "done":
            self.done = ev.done
            self.stop = stop_reason(ev.done, self._calls > 0)
            self._close(out)
            u = usage(ev.done)
            out.append({
                "type": "message_delta",
                "delta": {"stop_reason": self.stop[0], "stop_sequence": self.stop[1]},
                "usage": {
                    "output_tokens": u["output_tokens"],
                    "input_tokens": u["input_tokens"],
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": u["cache_read_input_tokens"],
                },
            })
            out.append({"type": "message_stop"})
            return out
        ch = ev.chunk
        if ch.thinking:
            self._write(out, "thinking", ch.thinking)
        if ch.text:
            self._write(out, "text", ch.text)
        for call in ch.tool_calls:
            self._calls += 1
            args = call.arguments_json or "{}"
            index = self._block(out, {"type": "tool_use", "id": _tool_use_id(call.id), "name": call.name,
                                      "input": {}})
            self.content[index]["input"] = _tool_input(args)
            out.append({"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": args}})
            out.append({"type": "content_block_stop", "index": index})
        return out

    def message(self) -> wire.AnthropicMessage:
        """The whole answer, once every event went through ``render``."""
        m = self._skeleton()
        m["content"] = self.content  # type: ignore[typeddict-item]
        m["stop_reason"], m["stop_sequence"] = self.stop  # type: ignore[typeddict-item]
        m["usage"] = usage(self.done)
        return m


def _tool_use_id(call_id: str) -> str:
    """Anthropic's ids are "toolu_..."; a call's own id keeps its unique part ("call_ab12" -> "toolu_ab12")."""
    if call_id.startswith("toolu_"):
        return call_id
    if not call_id:
        return new_id("toolu")
    return "toolu_" + call_id.removeprefix("call_")
