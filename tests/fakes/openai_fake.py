"""A fake OpenAI-compatible cloud API: an aiohttp app on port 0.

Replays the OpenAI REST wire format: ``POST /v1/chat/completions`` with
``stream: true`` answers ``text/event-stream`` with ``data: {json}`` events
(``choices[0].delta``), then, when ``stream_options.include_usage`` is set, one
event with empty ``choices`` and ``usage``, then ``data: [DONE]``; tool calls
stream as ``delta.tool_calls`` pieces (id and name first, the arguments string
in fragments).  ``/v1/completions`` streams ``choices[0].text``;
``/v1/embeddings`` and ``/v1/models`` answer lists; ``/v1/rerank`` answers the
Jina / vLLM shape (``id``, ``model``, ``usage.total_tokens``, ``results`` of
``index``, ``relevance_score``, ``document``), scoring a document by the share
of the query's words it holds.  Errors are
``{"error": {"message", "type", "param", "code"}}``.

Used where the real thing cannot run: faults, tool-call deltas, and keys that
an upstream echoes back in error messages.

Faults (``tests.fakes.ollama_fake.Fault``): "status", "disconnect" (after
``after`` events), and the hung upstreams: "hang" (no headers for ``delay``
seconds), "hang_after_headers" (headers, then silence), "keepalive" (headers,
the role-only first delta, then only ``: keep-alive`` SSE comments every
``interval`` seconds -- what providers send while a model thinks) and "stall"
(``after`` events, then silence, or comments when ``interval`` is set).  Each
holds the request for at most ``delay`` seconds, then answers normally, and
ends early when the client goes away (counted in ``disconnects``).  (Plain streaming is tested against
``mlx_lm.server``, a real OpenAI-compatible server.)
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from aiohttp import web

from tests.fakes.loopback import LoopbackServer, client_gone, hold
from tests.fakes.ollama_fake import Fault

#: Faults that act once the event stream has begun (the rest act in ``_begin``).
STREAM_FAULTS = ("disconnect", "hang_after_headers", "keepalive", "stall")


@dataclass
class FakeOpenAI(LoopbackServer):
    models: list[str] = field(default_factory=lambda: ["gpt-test"])
    reply: list[str] = field(default_factory=lambda: ["Hi", " there"])
    #: when set, the chat reply is these tool calls (name, arguments JSON text)
    tool_calls: Optional[list[tuple[str, str]]] = None
    #: the key the fake accepts; None accepts anything
    api_key: Optional[str] = None
    fault: Optional[Fault] = None
    #: seconds between events
    chunk_delay: float = 0.0
    #: send the whole stream in one write (as a fast upstream's kernel buffer delivers it)
    one_write: bool = False
    #: reasoning pieces streamed (as ``delta.reasoning_content``) before the reply
    reasoning: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.requests: list[tuple[str, Any, dict[str, str]]] = []
        self.disconnected = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/rerank", self.rerank)
        return app

    async def start(self) -> str:
        await self.serve()
        return self.base_url

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _error(status: int, message: str, type_: str, code: Any = None, headers=None) -> web.Response:
        return web.json_response(
            {"error": {"message": message, "type": type_, "param": None, "code": code}},
            status=status,
            headers=headers,
        )

    def _auth(self, request: web.Request) -> Optional[web.Response]:
        if self.api_key is None:
            return None
        got = request.headers.get("Authorization", "")
        if got != f"Bearer {self.api_key}":
            # Like real providers, echo what was sent: the adapter must scrub it.
            sent = got.removeprefix("Bearer ")
            return self._error(401, f"Incorrect API key provided: {sent}.", "invalid_request_error",
                               "invalid_api_key")
        return None

    async def _begin(self, request: web.Request) -> tuple[Optional[web.Response], dict]:
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "invalid JSON body", "invalid_request_error"), {}
        self.requests.append((request.path, body, dict(request.headers)))
        denied = self._auth(request)
        if denied is not None:
            return denied, body
        if body.get("model") not in self.models:
            return self._error(404, f"The model `{body.get('model')}` does not exist.",
                               "invalid_request_error", "model_not_found"), body
        f = self.fault
        if f is not None:
            if f.times is not None:
                f.times -= 1
                if f.times <= 0:
                    self.fault = None
            if f.kind == "status":
                headers = {"Retry-After": f.retry_after} if f.retry_after else None
                return self._error(f.status, f.message, "server_error", headers=headers), body
            if f.kind == "hang" and not await hold(request, f.delay):
                self.client_left()
                return web.Response(status=499), body
        return None, body

    async def _sse(self, request: web.Request, events: list[dict], fault: Optional[Fault]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        keepalive = (b": keep-alive\n\n",)
        kind = fault.kind if fault is not None else None
        try:
            if self.one_write and fault is None:
                body = b"".join(f"data: {json.dumps(ev)}\n\n".encode() for ev in events)
                await resp.write(b": connected\n\n" + body + b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            await resp.write(b": connected\n\n")
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
                    if not await hold(request, fault.delay, resp, keepalive, fault.interval):
                        raise ConnectionResetError
                if client_gone(request):
                    raise ConnectionResetError
                await resp.write(f"data: {json.dumps(ev)}\n\n".encode())
                if fault is not None and i == 0 and kind == "keepalive":
                    # after the role-only first delta: comments, no token
                    if not await hold(request, fault.delay, resp, keepalive, fault.interval or 0.05):
                        raise ConnectionResetError
                await asyncio.sleep(self.chunk_delay)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, RuntimeError):
            self.client_left()
        return resp

    # ------------------------------------------------------------ endpoints

    async def chat(self, request: web.Request) -> web.StreamResponse:
        fault = self.fault
        err, body = await self._begin(request)
        if err is not None:
            return err
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body["model"]}
        events: list[dict] = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None}])]
        finish = "stop"
        if self.tool_calls and body.get("tools"):
            for i, (name, args) in enumerate(self.tool_calls):
                events.append(dict(base, choices=[{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                    {"index": i, "id": f"call_{i}", "type": "function",
                     "function": {"name": name, "arguments": ""}}]}}]))
                for j in range(0, len(args), 5):  # the arguments arrive in fragments
                    events.append(dict(base, choices=[{"index": 0, "finish_reason": None, "delta": {
                        "tool_calls": [{"index": i, "function": {"arguments": args[j:j + 5]}}]}}]))
            finish = "tool_calls"
        else:
            for piece in self.reasoning:
                events.append(dict(base, choices=[{"index": 0, "delta": {"reasoning_content": piece},
                                                   "finish_reason": None}]))
            for piece in self.reply:
                events.append(dict(base, choices=[{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        events.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(dict(base, choices=[], usage={
                "prompt_tokens": 11, "completion_tokens": len(events) - 2, "total_tokens": 11 + len(events) - 2,
                "prompt_tokens_details": {"cached_tokens": 3}}))
        if not body.get("stream"):
            return self._error(400, "this fake only streams", "invalid_request_error")
        return await self._sse(request, events, fault if fault is not None and fault.kind in STREAM_FAULTS else None)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        fault = self.fault
        err, body = await self._begin(request)
        if err is not None:
            return err
        base = {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": body["model"]}
        events = [dict(base, choices=[{"index": 0, "text": p, "finish_reason": None}]) for p in self.reply]
        events.append(dict(base, choices=[{"index": 0, "text": "", "finish_reason": "length"}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(dict(base, choices=[], usage={"prompt_tokens": 5, "completion_tokens": len(self.reply),
                                                         "total_tokens": 5 + len(self.reply)}))
        return await self._sse(request, events, fault if fault is not None and fault.kind in STREAM_FAULTS else None)

    async def embeddings(self, request: web.Request) -> web.Response:
        err, body = await self._begin(request)
        if err is not None:
            return err
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 0.5, -0.5]}
                for i, t in reversed(list(enumerate(inputs)))]  # out of order on purpose
        return web.json_response({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    async def list_models(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, None, dict(request.headers)))
        denied = self._auth(request)
        if denied is not None:
            return denied
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]})

    async def rerank(self, request: web.Request) -> web.Response:
        err, body = await self._begin(request)
        if err is not None:
            return err
        words = set(str(body.get("query", "")).split())
        docs = [d if isinstance(d, str) else d.get("text", "") for d in body.get("documents") or []]
        scores = [len(words & set(d.split())) / max(1, len(words)) for d in docs]
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[: body.get("top_n") or len(docs)]
        results = [{"index": i, "relevance_score": scores[i], "document": {"text": docs[i]}} for i in order]
        return web.json_response({"id": "rerank-fake", "model": body["model"],
                                  "usage": {"total_tokens": sum(len(d.split()) for d in docs)}, "results": results})
