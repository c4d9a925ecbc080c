"""OpenAI Responses <-> proto.  Requests in, items and events out; no I/O here.

The wire format is declared once, in ``mlxgate/dialects/responses.py``.  This
module maps it onto the contract:

- ``create_request`` parses a body and checks the dialect's own rules (what is
  not served is a 400 that says so), turns the ``input`` into **items** (the
  normalised shapes ``input_items`` lists and the store keeps, each with an
  id) and builds the ``pb.GenerateRequest`` without its messages;
- ``generate_request`` adds the messages: ``instructions`` as a system
  message, then the stored conversation (``previous_response_id``: each
  earlier response's input items and output items, oldest first), then the
  new items (``messages_pb``).  A continued conversation renders as the same
  prompt prefix as the turn before, so the MLX engine's prompt cache serves
  that prefix (``usage.input_tokens_details.cached_tokens``);
- ``Assembler`` turns ``pb.Chunk`` / ``pb.Done`` events into output items
  (reasoning, message, function_call) and, when streaming, the event
  sequence of OpenAI's API, each with a ``sequence_number``:
  ``response.created``, ``response.in_progress``, then per item
  ``response.output_item.added`` ... ``response.output_item.done`` (text:
  ``content_part.added``, ``output_text.delta``, ``output_text.done``,
  ``content_part.done``; reasoning: the same with ``reasoning_text``; a call:
  ``function_call_arguments.delta`` and ``.done``), then
  ``response.completed`` or ``response.incomplete`` (``max_output_tokens``);
  a failure after the stream began is ``error`` then ``response.failed``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel

from gateway.errors import ApiError, bad_request, openai_type
from gateway.events import check_done, finish_of
from gateway.images import image_bytes, image_detail
from gateway.parsing import parse
from gateway.tools import choose_tools, text_format
from mlxgate import jsonutil, limits
from mlxgate.dialects import responses as wire
from mlxgate.dialects.base import produced_arguments
from mlxgate.v1 import inference_pb2 as pb

ROUTE = "/v1/responses"

_ROLE = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}


def new_id(prefix: str) -> str:
    """``resp_``, ``msg_``, ``fc_``, ``rs_``... and 32 random hex digits (128 bits: unguessable)."""
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------- the request


@dataclass
class Parsed:
    r: wire.CreateRequest
    #: The new input items, normalised (what the store keeps and input_items lists).
    items: list[dict[str, Any]]
    #: The generation request without its messages.
    base: pb.GenerateRequest
    #: What the Response object echoes.
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = "auto"
    text: dict[str, Any] = field(default_factory=lambda: {"format": {"type": "text"}})

    @property
    def store(self) -> bool:
        return self.r.store is not False

    @property
    def stream(self) -> bool:
        return bool(self.r.stream)


def _refuse_unsupported(r: wire.CreateRequest) -> None:
    if r.background:
        raise bad_request("background mode is not supported; leave background unset or false", param="background")
    if r.conversation is not None:
        raise bad_request("conversation objects are not supported; use previous_response_id", param="conversation")
    if r.prompt is not None:
        raise bad_request("prompt templates are not supported; send instructions and input", param="prompt")


def _part(part: BaseModel, name: str, role: str) -> dict[str, Any]:
    """One content part, normalised; images only from the user, as data: URLs."""
    if isinstance(part, wire.InputText):
        return {"type": "input_text", "text": part.text}
    if isinstance(part, wire.OutputText):
        return {"type": "output_text", "text": part.text, "annotations": []}
    if isinstance(part, wire.RefusalPart):
        return {"type": "refusal", "refusal": part.refusal}
    if isinstance(part, wire.InputImage):
        if part.file_id is not None:
            raise bad_request(f"{name}.file_id: file inputs by id are not supported; send the image as a data: URL",
                              param=f"{name}.file_id")
        if part.image_url is None:
            raise bad_request(f"{name}.image_url is required", param=f"{name}.image_url")
        if role != "user":
            raise bad_request(f"{name}: images are supported in user messages only", param=f"{name}.type")
        image_bytes(part.image_url, f"{name}.image_url", bare_base64=True)
        detail = part.detail if isinstance(part.detail, str) else "auto"
        return {"type": "input_image", "image_url": part.image_url, "detail": detail}
    raise bad_request(f"{name}.type 'input_file': file inputs are not supported", param=f"{name}.type")


def _message(m: wire.MessageItem, name: str) -> dict[str, Any]:
    if isinstance(m.content, str):
        kind = "output_text" if m.role == "assistant" else "input_text"
        parts: list[dict[str, Any]] = [{"type": kind, "text": m.content}]
        if kind == "output_text":
            parts[0]["annotations"] = []
    else:
        parts = [_part(p, f"{name}.content[{j}]", m.role) for j, p in enumerate(m.content)]
    return {"id": m.id or new_id("msg"), "type": "message", "role": m.role, "status": "completed", "content": parts}


def _call_output(o: wire.FunctionCallOutputItem, name: str) -> dict[str, Any]:
    output: Any = o.output
    if not isinstance(output, str):
        output = []
        for j, p in enumerate(o.output):
            pname = f"{name}.output[{j}]"
            if not isinstance(p, (wire.InputText, wire.OutputText)):
                raise bad_request(f"{pname}.type {p.type!r} is not supported in a function_call_output (text only)",
                                  param=f"{pname}.type")
            output.append(_part(p, pname, "tool"))
    return {"id": o.id or new_id("fco"), "type": "function_call_output", "status": "completed", "call_id": o.call_id,
            "output": output}


def input_items(value: Any) -> list[dict[str, Any]]:
    """``input`` as items, each with an id (kept when the caller gave one)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": value}]}]
    out: list[dict[str, Any]] = []
    for i, it in enumerate(value):
        name = f"input[{i}]"
        if isinstance(it, wire.MessageItem):
            out.append(_message(it, name))
        elif isinstance(it, wire.FunctionCallItem):
            out.append({"id": it.id or new_id("fc"), "type": "function_call", "status": "completed",
                        "call_id": it.call_id, "name": it.name, "arguments": it.arguments})
        elif isinstance(it, wire.FunctionCallOutputItem):
            out.append(_call_output(it, name))
        else:
            assert isinstance(it, wire.ReasoningItem)
            out.append({
                "id": it.id or new_id("rs"), "type": "reasoning",
                "summary": [{"type": "summary_text", "text": s.text} for s in it.summary],
                "content": [{"type": "reasoning_text", "text": c.text} for c in it.content or ()],
            })
    return out


def _tools(r: wire.CreateRequest) -> tuple[list[wire.FunctionTool], Optional[pb.ToolChoice]]:
    """The tools to send and whether a call is forced (as the chat dialect does)."""
    tools = list(r.tools or ())
    tc = r.tool_choice
    if tc is None or isinstance(tc, str):
        return choose_tools(tools, lambda t: t.name, tc or "auto")
    if isinstance(tc, wire.NamedFunction):
        return choose_tools(tools, lambda t: t.name, "function", tc.name)
    names = {t.name for t in tc.tools}
    known = {t.name for t in tools}
    unknown = sorted(names - known)
    if unknown:
        raise bad_request(f"tool_choice.tools names {limits.clip_name(unknown[0])!r}, which is not in tools",
                          param="tool_choice.tools")
    chosen = [t for t in tools if t.name in names]
    if not chosen and tc.mode == "required":
        raise bad_request('tool_choice mode "required" needs tools', param="tool_choice.tools")
    return chosen, pb.ToolChoice(mode=pb.TOOL_CHOICE_REQUIRED) if tc.mode == "required" else None


def _format(text: Optional[wire.TextConfig]) -> tuple[pb.OutputFormat, dict[str, Any]]:
    f = text.format if text is not None else None
    if f is None or isinstance(f, wire.FormatText):
        return pb.OutputFormat(), {"type": "text"}
    if isinstance(f, wire.FormatJSONObject):
        return pb.OutputFormat(type=pb.FORMAT_TYPE_JSON), {"type": "json_object"}
    echo: dict[str, Any] = {"type": "json_schema", "name": f.name or "response", "schema": f.schema_}
    if f.description is not None:
        echo["description"] = f.description
    if f.strict is not None:
        echo["strict"] = f.strict
    return pb.OutputFormat(type=pb.FORMAT_TYPE_JSON_SCHEMA, json_schema=jsonutil.dumps(f.schema_)), echo


def _dump(v: Any) -> Any:
    return v.model_dump(mode="json", exclude_none=True, by_alias=True) if isinstance(v, BaseModel) else v


def create_request(data: dict[str, Any]) -> Parsed:
    r = parse(wire.CreateRequest, data, ROUTE)
    _refuse_unsupported(r)
    if r.input is None and r.previous_response_id is None:
        raise bad_request("input is required", param="input")
    items = input_items(r.input)
    tools, choice = _tools(r)
    fmt, fmt_echo = _format(r.text)
    fmt = text_format(fmt, choice)
    sampling = pb.SamplingParams()
    if r.temperature is not None:
        sampling.temperature = r.temperature
    if r.top_p is not None:
        sampling.top_p = r.top_p
    if r.max_output_tokens is not None:
        sampling.max_tokens = r.max_output_tokens
    base = pb.GenerateRequest(
        model=r.model,
        tools=[
            pb.Tool(name=t.name, description=t.description or "", parameters_json=jsonutil.dumps(t.parameters or {}))
            for t in tools
        ],
        sampling=sampling,
        format=fmt,
    )
    if choice is not None:
        base.tool_choice.CopyFrom(choice)
    if r.reasoning is not None and r.reasoning.effort is not None:
        base.think = r.reasoning.effort != "none"
    if r.truncation == "auto":
        base.truncate = True
    echo_tools = [
        {"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
         "strict": t.strict if isinstance(t.strict, bool) else None}
        for t in r.tools or ()
    ]
    return Parsed(r, items, base, echo_tools, _dump(r.tool_choice) if r.tool_choice is not None else "auto",
                  {"format": fmt_echo})


def _texts(parts: Any) -> str:
    if isinstance(parts, str):
        return parts
    out = []
    for p in parts or ():
        kind = p.get("type")
        if kind in ("input_text", "output_text", "summary_text", "reasoning_text"):
            out.append(p.get("text", ""))
        elif kind == "refusal":
            out.append(p.get("refusal", ""))
    return "".join(out)


def messages_pb(items: list[dict[str, Any]]) -> list[pb.ChatMessage]:
    """A conversation's items as chat messages: a function_call joins the
    assistant message before it (or starts one), a function_call_output is a
    tool message, a reasoning item's text goes to the next assistant message
    as its thinking.  Items are normalised (``input_items``) or stored ones."""
    out: list[pb.ChatMessage] = []
    names: dict[str, str] = {}
    thinking: list[str] = []

    def assistant() -> pb.ChatMessage:
        msg = pb.ChatMessage(role=pb.ROLE_ASSISTANT, thinking="".join(thinking))
        thinking.clear()
        out.append(msg)
        return msg

    for item in items:
        kind = item.get("type")
        if kind == "message":
            role = wire.ROLES.get(item.get("role", ""), "user")
            content = item.get("content")
            if role == "assistant":
                msg = assistant()
                msg.content = _texts(content)
                continue
            parts = [p for p in content or () if isinstance(p, dict) and p.get("type") == "input_image"
                     ] if not isinstance(content, str) else []
            images = [image_bytes(p["image_url"], "image_url", bare_base64=True) for p in parts]
            details = [image_detail(p.get("detail")) for p in parts]
            out.append(pb.ChatMessage(role=_ROLE[role], content=_texts(content), images=images,
                                      image_details=details if any(details) else []))
            thinking.clear()  # reasoning belongs to the assistant turn right after it
        elif kind == "function_call":
            msg = out[-1] if out and out[-1].role == pb.ROLE_ASSISTANT and not thinking else assistant()
            call_id = item.get("call_id", "")
            names[call_id] = item.get("name", "")
            msg.tool_calls.append(pb.ToolCall(
                id=call_id, name=item.get("name", ""), index=len(msg.tool_calls),
                arguments_json=jsonutil.dumps(produced_arguments(item.get("arguments"))),
            ))
        elif kind == "function_call_output":
            call_id = item.get("call_id", "")
            out.append(pb.ChatMessage(role=pb.ROLE_TOOL, content=_texts(item.get("output")), tool_call_id=call_id,
                                      tool_name=names.get(call_id, "")))
        elif kind == "reasoning":
            thinking.append(_texts(item.get("content")) or _texts(item.get("summary")))
    return out


def generate_request(p: Parsed, history: list[dict[str, Any]]) -> pb.GenerateRequest:
    """The whole request: instructions, the stored conversation, the new items."""
    req = pb.GenerateRequest()
    req.CopyFrom(p.base)
    if p.r.instructions:
        req.chat.messages.append(pb.ChatMessage(role=pb.ROLE_SYSTEM, content=p.r.instructions))
    req.chat.messages.extend(messages_pb([*history, *p.items]))
    if not req.chat.messages:
        raise bad_request("input is required: the conversation has no messages", param="input")
    return req


# ---------------------------------------------------------------- the answer


def usage(done: pb.Done, reasoning_tokens: int) -> wire.Usage:
    return {
        "input_tokens": done.prompt_tokens,
        "input_tokens_details": {"cached_tokens": done.cached_prompt_tokens, "cache_write_tokens": 0},
        "output_tokens": done.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, done.completion_tokens)},
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def stored(body: bytes) -> bytes:
    """A stored Response object as answered now: one stored by an earlier
    version lacks ``usage.input_tokens_details.cache_write_tokens`` (required
    by OpenAI's spec since July 2026) and gets it, 0.  Current ones pass as
    they are, unparsed."""
    if b'"cache_write_tokens"' in body:
        return body
    response = jsonutil.loads(body, "stored response")
    usage = response.get("usage") if isinstance(response, dict) else None
    details = usage.get("input_tokens_details") if isinstance(usage, dict) else None
    if not isinstance(details, dict):
        return body
    details["cache_write_tokens"] = 0
    return jsonutil.dumps(response).encode()


#: HTTP status of a failure -> ``response.error.code`` (the codes OpenAI's Response object knows).
_FAILURE_CODE = {400: "invalid_prompt", 429: "rate_limit_exceeded"}


@dataclass
class _Open:
    kind: str  # "message" | "reasoning"
    item: dict[str, Any]
    index: int
    parts: list[str] = field(default_factory=list)


class Assembler:
    """One response being generated: its output items, and (``stream``) its events."""

    def __init__(self, p: Parsed, stream: bool) -> None:
        self.p = p
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.stream = stream
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.reasoning_tokens = 0
        self._open: Optional[_Open] = None
        #: Set by ``fail``: the failed Response object.
        self.failed: Optional[dict[str, Any]] = None

    # ---------------------------------------------------------------- the Response object

    def response(
        self,
        status: str,
        output: Optional[list[dict[str, Any]]] = None,
        use: Optional[wire.Usage] = None,
        error: Optional[wire.ResponseError] = None,
        incomplete: Optional[str] = None,
    ) -> dict[str, Any]:
        r = self.p.r
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "model": r.model,
            "output": output if output is not None else [],
            "instructions": r.instructions,
            "tools": self.p.tools,
            "tool_choice": self.p.tool_choice,
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "text": self.p.text,
            "reasoning": {"effort": r.reasoning.effort if r.reasoning else None, "summary": None},
            "temperature": r.temperature,
            "top_p": r.top_p,
            "max_output_tokens": r.max_output_tokens,
            "truncation": r.truncation or "disabled",
            "previous_response_id": r.previous_response_id,
            "store": self.p.store,
            "metadata": dict(r.metadata or {}),
            "background": False,
            "usage": use,
        }

    # ---------------------------------------------------------------- events

    def _emit(self, out: list[dict[str, Any]], kind: str, **fields: Any) -> None:
        if self.stream:
            out.append({"type": kind, "sequence_number": self.seq, **fields})
            self.seq += 1

    def start(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        snapshot = self.response("in_progress")
        self._emit(out, "response.created", response=snapshot)
        self._emit(out, "response.in_progress", response=snapshot)
        return out

    def feed(self, ch: pb.Chunk) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if ch.thinking:
            if not ch.text:
                self.reasoning_tokens += len(ch.token_ids)
            self._delta(out, "reasoning", ch.thinking)
        if ch.text:
            self._delta(out, "message", ch.text)
        for call in ch.tool_calls:
            self._close(out, "completed")
            self._call(out, call)
        return out

    def _begin(self, out: list[dict[str, Any]], kind: str) -> _Open:
        index = len(self.output)
        part: dict[str, Any]
        if kind == "message":
            item: dict[str, Any] = {"id": new_id("msg"), "type": "message", "role": "assistant",
                                    "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        self.output.append(item)
        self._open = _Open(kind, item, index)
        self._emit(out, "response.output_item.added", output_index=index, item={**item, "content": []})
        self._emit(out, "response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                   part=part)
        return self._open

    def _delta(self, out: list[dict[str, Any]], kind: str, text: str) -> None:
        o = self._open
        if o is None or o.kind != kind:
            self._close(out, "completed")
            o = self._begin(out, kind)
        o.parts.append(text)
        where = {"item_id": o.item["id"], "output_index": o.index, "content_index": 0}
        if kind == "message":
            self._emit(out, "response.output_text.delta", **where, delta=text, logprobs=[])
        else:
            self._emit(out, "response.reasoning_text.delta", **where, delta=text)

    def _close(self, out: list[dict[str, Any]], status: str) -> None:
        o = self._open
        if o is None:
            return
        self._open = None
        text = "".join(o.parts)
        item = o.item
        where = {"item_id": item["id"], "output_index": o.index, "content_index": 0}
        part: dict[str, Any]
        if o.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            self._emit(out, "response.output_text.done", **where, text=text, logprobs=[])
        else:
            part = {"type": "reasoning_text", "text": text}
            self._emit(out, "response.reasoning_text.done", **where, text=text)
        item["content"] = [part]
        item["status"] = status
        self._emit(out, "response.content_part.done", **where, part=part)
        self._emit(out, "response.output_item.done", output_index=o.index, item=item)

    def _call(self, out: list[dict[str, Any]], call: pb.ToolCall) -> None:
        index = len(self.output)
        # arguments_json is JSON text of an object already (the service wrote it).
        args = call.arguments_json or "{}"
        item = {"id": new_id("fc"), "type": "function_call", "status": "completed",
                "call_id": call.id or new_id("call"), "name": call.name, "arguments": args}
        self.output.append(item)
        self._emit(out, "response.output_item.added", output_index=index,
                   item={**item, "status": "in_progress", "arguments": ""})
        self._emit(out, "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=args)
        self._emit(out, "response.function_call_arguments.done", item_id=item["id"], output_index=index,
                   name=call.name, arguments=args)
        self._emit(out, "response.output_item.done", output_index=index, item=item)

    def finish(self, done: pb.Done) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """(the events closing the output, the terminal event, the final Response).
        A Done reporting a failure raises ``ApiError``."""
        check_done(done)
        incomplete = wire.INCOMPLETE_REASON.get(finish_of(done))
        status = "incomplete" if incomplete else "completed"
        out: list[dict[str, Any]] = []
        self._close(out, status)
        if not self.output:  # nothing at all: an empty message, so every answer has one
            self._begin(out, "message")
            self._close(out, status)
        final = self.response(status, self.output, usage(done, self.reasoning_tokens), incomplete=incomplete)
        terminal: list[dict[str, Any]] = []
        self._emit(terminal, f"response.{status}", response=final)
        return out, terminal, final

    def fail(self, err: ApiError) -> list[dict[str, Any]]:
        """A failure after the stream began: ``error``, then ``response.failed``."""
        out: list[dict[str, Any]] = []
        self._close(out, "incomplete")
        code = _FAILURE_CODE.get(err.status, "server_error")
        self.failed = self.response("failed", self.output, error={"code": code, "message": err.message})
        self._emit(out, "error", code=err.code or openai_type(err.status), message=err.message, param=err.param)
        self._emit(out, "response.failed", response=self.failed)
        return out


def items_page(data: list[dict[str, Any]], has_more: bool) -> wire.ItemList:
    return {
        "object": "list",
        "data": data,  # type: ignore[typeddict-item]
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
        "has_more": has_more,
    }


def not_found(response_id: str, param: Optional[str] = None) -> ApiError:
    return ApiError(404, f"Response with id '{limits.clip_name(response_id)}' not found.", param=param,
                    code="previous_response_not_found" if param == "previous_response_id" else None)
