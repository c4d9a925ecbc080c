"""A fake Anthropic API: an aiohttp app on port 0 that replays the Messages
API's documented wire format.

``POST /v1/messages`` with ``stream: true`` answers ``text/event-stream`` with
named events (``event: <type>`` then ``data: {json}``): ``message_start`` (usage
with ``input_tokens`` and ``cache_read_input_tokens``), a ``ping``, then per
content block ``content_block_start`` / ``content_block_delta`` ... /
``content_block_stop`` -- thinking (``thinking_delta``s, then a
``signature_delta``), text (``text_delta``s), tool calls (``tool_use`` started
with an empty ``input``, the input JSON in ``input_json_delta`` fragments) --,
then ``message_delta`` (``stop_reason``, ``stop_sequence``, usage
``output_tokens``) and ``message_stop``.  Without ``stream`` it answers the
whole Message.  ``/v1/messages/count_tokens`` answers ``{"input_tokens": N}``;
``GET /v1/models`` lists models in pages (``has_more``, ``last_id``,
``after_id``).  Errors are ``{"type": "error", "error": {"type", "message"}}``
with Anthropic's statuses and types (429 ``rate_limit_error`` with
``retry-after``, 529 ``overloaded_error``, ...); a request without
``x-api-key`` (when ``api_key`` is set) or with another key is 401 and the
message echoes what was sent, as providers do, so the adapter's redaction is
tested; a request without ``anthropic-version`` is 400, as Anthropic answers.

Faults (``tests.fakes.ollama_fake.Fault``): "status", "disconnect" (after
``after`` events), "error_event" (``after`` events, then an ``event: error``
with ``message``, type ``overloaded_error``), and the hung upstreams: "hang"
(no headers for ``delay`` seconds), "hang_after_headers" (headers, then
silence), "keepalive" (``message_start``, then only ``ping`` events every
``interval`` seconds -- what Anthropic sends while a model is busy) and
"stall" (``after`` events, then silence, or pings when ``interval`` is set).
Each holds a request for at most ``delay`` seconds, then goes on, and ends
early when the client goes away (counted in ``disconnects``): no handler
outlives its test.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from aiohttp import web

from tests.fakes.loopback import LoopbackServer, client_gone, hold
from tests.fakes.ollama_fake import Fault

#: Faults that act once the event stream has begun (the rest act in ``_begin``).
STREAM_FAULTS = ("disconnect", "hang_after_headers", "keepalive", "stall", "error_event")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
          504: "timeout_error", 529: "overloaded_error"}

PING = {"type": "ping"}


def sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


@dataclass
class FakeAnthropic(LoopbackServer):
    models: list[str] = field(default_factory=lambda: ["claude-test"])
    reply: list[str] = field(default_factory=lambda: ["Hi", " there"])
    #: thinking pieces streamed (a thinking block, then its signature) before the
    #: reply when the request enables thinking
    thinking: list[str] = field(default_factory=list)
    #: when set (and the request has tools), the answer is these calls (name, input JSON text)
    tool_calls: Optional[list[tuple[str, str]]] = None
    #: answer as if this stop sequence ended the generation
    stop_sequence: Optional[str] = None
    #: the key the fake accepts; None accepts anything
    api_key: Optional[str] = None
    fault: Optional[Fault] = None
    #: seconds between events
    chunk_delay: float = 0.0
    #: what count_tokens answers
    count: int = 42
    #: models per page of GET /v1/models
    page_size: int = 1000

    def __post_init__(self) -> None:
        self.requests: list[tuple[str, Any, dict[str, str]]] = []
        self.disconnected = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.list_models)
        return app

    async def start(self) -> str:
        await self.serve()
        return self.base_url

    @property
    def base_url(self) -> str:
        """The API root (as ANTHROPIC_BASE_URL: no /v1)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ helpers

    @staticmethod
    def error(status: int, message: str, headers: Optional[dict] = None) -> web.Response:
        return web.json_response({"type": "error", "error": {"type": _TYPES.get(status, "api_error"),
                                                            "message": message}},
                                 status=status, headers=headers)

    def _auth(self, request: web.Request) -> Optional[web.Response]:
        if "Authorization" in request.headers:
            return self.error(401, "this API takes x-api-key, not Authorization")
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return self.error(401, f"invalid x-api-key: {request.headers.get('x-api-key', '')}")
        if not request.headers.get("anthropic-version"):
            return self.error(400, "anthropic-version: header is required")
        return None

    async def _begin(self, request: web.Request, generate: bool) -> tuple[Optional[web.Response], dict]:
        try:
            body = await request.json()
        except ValueError:
            return self.error(400, "invalid JSON body"), {}
        self.requests.append((request.path, body, dict(request.headers)))
        denied = self._auth(request)
        if denied is not None:
            return denied, body
        if generate and not isinstance(body.get("max_tokens"), int):
            return self.error(400, "max_tokens: Field required"), body
        if body.get("model") not in self.models:
            return self.error(404, f"model: {body.get('model')}"), body
        f = self.fault
        if f is not None and generate:
            if f.times is not None:
                f.times -= 1
                if f.times <= 0:
                    self.fault = None
            if f.kind == "status":
                headers = {"retry-after": f.retry_after} if f.retry_after else None
                return self.error(f.status, f.message, headers), body
            if f.kind == "hang" and not await hold(request, f.delay):
                self.client_left()
                return web.Response(status=499), body
        return None, body

    def _events(self, body: dict) -> tuple[list[dict], dict]:
        """The stream's events (without the opening ping) and the whole Message they build."""
        message: dict[str, Any] = {
            "id": "msg_fake01", "type": "message", "role": "assistant", "content": [], "model": body["model"],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 11, "output_tokens": 1, "cache_read_input_tokens": 3,
                      "cache_creation_input_tokens": 0},
        }
        events: list[dict] = [{"type": "message_start", "message": json.loads(json.dumps(message))}]
        content = message["content"]

        def block(start: dict, deltas: list[dict], whole: dict) -> None:
            index = len(content)
            events.append({"type": "content_block_start", "index": index, "content_block": start})
            events.extend({"type": "content_block_delta", "index": index, "delta": d} for d in deltas)
            events.append({"type": "content_block_stop", "index": index})
            content.append(whole)

        stop = "end_turn"
        if (body.get("thinking") or {}).get("type") == "enabled" and self.thinking:
            block({"type": "thinking", "thinking": "", "signature": ""},
                  [{"type": "thinking_delta", "thinking": t} for t in self.thinking]
                  + [{"type": "signature_delta", "signature": "c2lnbmVk"}],
                  {"type": "thinking", "thinking": "".join(self.thinking), "signature": "c2lnbmVk"})
        if self.tool_calls and body.get("tools"):
            for i, (name, args) in enumerate(self.tool_calls):
                block({"type": "tool_use", "id": f"toolu_fake{i}", "name": name, "input": {}},
                      [{"type": "input_json_delta", "partial_json": args[j:j + 5]} for j in range(0, len(args), 5)],
                      {"type": "tool_use", "id": f"toolu_fake{i}", "name": name, "input": json.loads(args)})
            stop = "tool_use"
        else:
            block({"type": "text", "text": ""}, [{"type": "text_delta", "text": p} for p in self.reply],
                  {"type": "text", "text": "".join(self.reply)})
            if self.stop_sequence is not None:
                stop = "stop_sequence"
        output = len(events) - 1
        events.append({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": self.stop_sequence},
                       "usage": {"output_tokens": output}})
        events.append({"type": "message_stop"})
        message.update(stop_reason=stop, stop_sequence=self.stop_sequence)
        message["usage"]["output_tokens"] = output
        return events, message

    async def _sse(self, request: web.Request, events: list[dict], fault: Optional[Fault]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        kind = fault.kind if fault is not None else None
        pings = (sse(PING),)
        try:
            if kind == "hang_after_headers":
                assert fault is not None
                if not await hold(request, fault.delay):
                    raise ConnectionResetError
            for i, ev in enumerate(events):
                if fault is not None and i == fault.after and kind == "disconnect":
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if fault is not None and i == fault.after and kind == "stall":
                    if not await hold(request, fault.delay, resp, pings, fault.interval):
                        raise ConnectionResetError
                if fault is not None and i == fault.after and kind == "error_event":
                    await resp.write(sse({"type": "error", "error": {"type": "overloaded_error",
                                                                      "message": fault.message}}))
                    await resp.write_eof()
                    return resp
                if client_gone(request):
                    raise ConnectionResetError
                await resp.write(sse(ev))
                if i == 0:
                    await resp.write(sse(PING))  # Anthropic's streams ping right after message_start
                    if kind == "keepalive":
                        # pings only, no token, for a while
                        assert fault is not None
                        if not await hold(request, fault.delay, resp, pings, fault.interval or 0.05):
                            raise ConnectionResetError
                await asyncio.sleep(self.chunk_delay)
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, RuntimeError):
            self.client_left()
        return resp

    # ------------------------------------------------------------ endpoints

    async def messages(self, request: web.Request) -> web.StreamResponse:
        fault = self.fault
        err, body = await self._begin(request, generate=True)
        if err is not None:
            return err
        events, message = self._events(body)
        if not body.get("stream"):
            return web.json_response(message)
        return await self._sse(request, events, fault if fault is not None and fault.kind in STREAM_FAULTS else None)

    async def count_tokens(self, request: web.Request) -> web.Response:
        err, body = await self._begin(request, generate=False)
        if err is not None:
            return err
        if "max_tokens" in body:  # not a field of count_tokens
            return self.error(400, "max_tokens: Extra inputs are not permitted")
        return web.json_response({"input_tokens": self.count})

    async def list_models(self, request: web.Request) -> web.Response:
        self.requests.append((request.path_qs, None, dict(request.headers)))
        denied = self._auth(request)
        if denied is not None:
            return denied
        after = request.query.get("after_id")
        start = self.models.index(after) + 1 if after in self.models else 0
        page = self.models[start:start + min(self.page_size, int(request.query.get("limit", "20")))]
        return web.json_response({
            "data": [{"type": "model", "id": m, "display_name": m.title(), "created_at": "2025-01-01T00:00:00Z"}
                     for m in page],
            "has_more": start + len(page) < len(self.models),
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        })
