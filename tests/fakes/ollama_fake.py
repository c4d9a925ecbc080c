"""A fake upstream Ollama: an aiohttp app on port 0 that speaks Ollama's wire format.

Replays what Ollama's docs/api.md documents: ``/api/generate`` and
``/api/chat`` stream NDJSON (``application/x-ndjson``), one JSON object per
line, the last with ``"done": true`` plus ``done_reason``,
``prompt_eval_count``, ``eval_count`` and the ``*_duration`` fields in
nanoseconds; ``"stream": false`` gives one object; errors are
``{"error": "..."}`` with a 4xx/5xx status (or, once a stream has started, as
its last line).  ``/api/embed``, ``/api/tags``, ``/api/show``, ``/api/ps``
answer with the documented shapes; an empty prompt loads a model and
``keep_alive: 0`` unloads it.

Knobs (set them between requests):

* ``fault``: a ``Fault`` applied to the next generation requests (chat and
  generate), see its fields;
* ``reply``: the pieces streamed back, one per line;
* ``thinking``: pieces streamed as ``thinking`` lines before ``reply``
  (not when the request has ``think: false``);
* ``tool_calls``: when set, /api/chat answers with these calls;
* ``chunk_delay``: seconds between lines;
* ``gate``: an event the stream waits for after its first line.

It records every request in ``requests`` (path, JSON body), counts clients
that go away in the middle of a generation request in ``disconnects`` and
sets ``disconnected`` at the first.

Ollama itself sends no keep-alive lines, but a proxy in front of it may:
the ``keepalive`` and ``stall`` faults send blank lines, empty objects and
lines with empty content, none of which carries a token.  Every fault that
holds a request is bounded by its ``delay`` and ends early when the client
goes away, so no handler outlives its test.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from aiohttp import web

from tests.fakes.loopback import LoopbackServer, client_gone, hold


def _norm(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Fault:
    """What goes wrong with a generation request.

    kind:
      "status"            answer ``status`` with ``{"error": message}`` (and Retry-After if set)
      "hang"              send nothing (not even headers) for ``delay`` seconds, then answer
      "hang_after_headers" send the 200 headers, then nothing for ``delay`` seconds, then the lines
      "keepalive"         send the 200 headers, then only keep-alive lines (every
                          ``interval`` seconds) for ``delay`` seconds, then the lines
      "stall"             stream ``after`` lines, then nothing for ``delay`` seconds
                          (keep-alive lines every ``interval`` seconds when set), then the rest
      "disconnect"        stream ``after`` lines, then drop the connection
      "error_line"        stream ``after`` lines, then an ``{"error": message}`` line
      "no_done"           stream the reply and end without the final done line
    """

    kind: str
    status: int = 500
    message: str = "internal error"
    retry_after: Optional[str] = None
    delay: float = 0.0
    after: int = 1
    #: seconds between keep-alive lines ("keepalive": 0 means 0.05; "stall": 0 means silence)
    interval: float = 0.0
    #: how many requests it applies to (None: all until cleared)
    times: Optional[int] = None


@dataclass
class FakeOllama(LoopbackServer):
    models: list[str] = field(default_factory=lambda: ["tiny:latest", "other:7b"])
    reply: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    tool_calls: Optional[list[dict]] = None
    #: thinking pieces streamed before ``reply`` (as Ollama does), unless the request says think=false
    thinking: list[str] = field(default_factory=list)
    chunk_delay: float = 0.0
    fault: Optional[Fault] = None
    embed_dims: int = 4
    #: when set, a stream pauses after its first line until this is set
    gate: Optional[asyncio.Event] = None

    def __post_init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.loaded: dict[str, float] = {}  # name -> keep_alive seconds
        self.request_ids: list[str] = []  # X-Request-Id of each request with a body
        self.disconnected = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_post("/api/show", self.show)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_get("/api/version", self.version)
        return app

    async def start(self) -> str:
        await self.serve()
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    # ------------------------------------------------------------ helpers

    def _has(self, name: str) -> bool:
        return _norm(name) in {_norm(m) for m in self.models}

    def _not_found(self, name: str) -> web.Response:
        return web.json_response(
            {"error": f'model "{name}" not found, try pulling it first'}, status=404
        )

    def _take_fault(self) -> Optional[Fault]:
        f = self.fault
        if f is None:
            return None
        if f.times is not None:
            f.times -= 1
            if f.times <= 0:
                self.fault = None
        return f

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "invalid JSON"}), content_type="application/json"
            ) from None
        self.requests.append((request.path, body))
        self.request_ids.append(request.headers.get("X-Request-Id", ""))
        return body

    # ------------------------------------------------------------ generation

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._generation(request, body, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._generation(request, body, chat=True)

    async def _generation(self, request: web.Request, body: dict, chat: bool) -> web.StreamResponse:
        model = body.get("model", "")
        if not model:
            return web.json_response({"error": "model is required"}, status=400)
        if not self._has(model):
            return self._not_found(model)
        keep_alive = body.get("keep_alive")
        empty = (not body.get("messages")) if chat else (not body.get("prompt"))
        if empty:  # load / unload
            if keep_alive == 0:
                self.loaded.pop(_norm(model), None)
                reason = "unload"
            else:
                self.loaded[_norm(model)] = float(keep_alive if isinstance(keep_alive, (int, float)) else 300)
                reason = "load"
            out: dict[str, Any] = {"model": model, "created_at": _now(), "done": True, "done_reason": reason}
            if chat:
                out["message"] = {"role": "assistant", "content": ""}
            else:
                out["response"] = ""
            if reason == "load":
                out["load_duration"] = 1_000_000
            return web.json_response(out)

        fault = self._take_fault()
        if fault is not None and fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            return web.json_response({"error": fault.message}, status=fault.status, headers=headers)
        if fault is not None and fault.kind == "hang":
            if not await hold(request, fault.delay):
                self.client_left()
                return web.Response(status=499)

        self.loaded[_norm(model)] = 300.0
        options = body.get("options") or {}
        thoughts = [] if body.get("think") is False else [("thinking", t) for t in self.thinking]
        pieces = thoughts + [("content", t) for t in self.reply]
        done_reason = "stop"
        limit = options.get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(pieces):
            pieces, done_reason = pieces[:limit], "length"

        def line(piece: tuple[str, str]) -> dict:
            kind, text = piece
            d: dict[str, Any] = {"model": model, "created_at": _now(), "done": False}
            msg = {"content": "", "thinking": text} if kind == "thinking" else {"content": text}
            if chat:
                d["message"] = {"role": "assistant", **msg}
            else:
                d["response"] = msg["content"]
                if kind == "thinking":
                    d["thinking"] = text
            return d

        final: dict[str, Any] = {
            "model": model,
            "created_at": _now(),
            "done": True,
            "done_reason": done_reason,
            "total_duration": 5_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": 7,
            "prompt_eval_duration": 1_500_000,
            "eval_count": len(pieces),
            "eval_duration": 2_500_000,
        }
        if chat:
            final["message"] = {"role": "assistant", "content": ""}
            if self.tool_calls and body.get("tools"):
                final["message"]["tool_calls"] = self.tool_calls
        else:
            final["response"] = ""
            final["context"] = [1, 2, 3]

        if body.get("stream", True) is False:
            text = "".join(t for k, t in pieces if k == "content")
            thought = "".join(t for k, t in pieces if k == "thinking")
            if chat:
                final["message"]["content"] = text
                if thought:
                    final["message"]["thinking"] = thought
            else:
                final["response"] = text
                if thought:
                    final["thinking"] = thought
            return web.json_response(final)

        # What a keep-alive may look like: a blank line, an empty object, a
        # line whose content is empty.  None carries a token.
        empty = {"model": model, "created_at": _now(), "done": False}
        empty.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
        keepalive = (b"\n", b"{}\n", json.dumps(empty).encode() + b"\n")

        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        held = True
        if fault is not None and fault.kind == "hang_after_headers":
            held = await hold(request, fault.delay)
        elif fault is not None and fault.kind == "keepalive":
            held = await hold(request, fault.delay, resp, keepalive, fault.interval or 0.05)
        if not held:
            self.client_left()
            return resp
        try:
            for i, piece in enumerate(pieces):
                if fault is not None and fault.kind == "stall" and i == fault.after:
                    if not await hold(request, fault.delay, resp, keepalive, fault.interval):
                        raise ConnectionResetError
                if fault is not None and i == fault.after:
                    if fault.kind == "disconnect":
                        assert request.transport is not None
                        request.transport.close()
                        return resp
                    if fault.kind == "error_line":
                        await resp.write(json.dumps({"error": fault.message}).encode() + b"\n")
                        await resp.write_eof()
                        return resp
                if client_gone(request):
                    raise ConnectionResetError
                await resp.write(json.dumps(line(piece)).encode() + b"\n")
                if i == 0 and self.gate is not None:
                    await self.gate.wait()
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            if fault is not None and fault.kind == "error_line" and fault.after >= len(pieces):
                await resp.write(json.dumps({"error": fault.message}).encode() + b"\n")
            elif fault is None or fault.kind != "no_done":
                await resp.write(json.dumps(final).encode() + b"\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, RuntimeError):
            self.client_left()
        return resp

    # ------------------------------------------------------------ the rest

    async def embed(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        model = body.get("model", "")
        if not self._has(model):
            return self._not_found(model)
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        dims = int(body.get("dimensions") or self.embed_dims)
        vecs = [[round((len(t) + j) / 100.0, 4) for j in range(dims)] for t in inputs]
        return web.json_response(
            {
                "model": model,
                "embeddings": vecs,
                "total_duration": 14143917,
                "load_duration": 1019500,
                "prompt_eval_count": sum(len(t.split()) for t in inputs),
            }
        )

    async def tags(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, None))
        return web.json_response(
            {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "modified_at": "2024-11-04T14:56:49.277302595-07:00",
                        "size": 7365960935,
                        "digest": "9f438cb9cd581fc025612d27f7c1a6669ff83a8bb0ed86c94fcf4c5440555697",
                        "details": {
                            "format": "gguf",
                            "family": "llama",
                            "families": None,
                            "parameter_size": "13B",
                            "quantization_level": "Q4_0",
                        },
                    }
                    for m in self.models
                ]
            }
        )

    async def show(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        model = body.get("model", "")
        if not self._has(model):
            return self._not_found(model)
        return web.json_response(
            {
                "modelfile": "FROM /blobs/sha256:0000",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "license": "MIT",
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "llama",
                    "families": ["llama"],
                    "parameter_size": "8.0B",
                    "quantization_level": "Q4_0",
                },
                "model_info": {
                    "general.architecture": "llama",
                    "general.parameter_count": 8030261248,
                    "llama.context_length": 8192,
                },
                "capabilities": ["completion", "tools"],
                "modified_at": "2024-11-04T14:56:49.277302595-07:00",
            }
        )

    async def ps(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, None))
        expires = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
        return web.json_response(
            {
                "models": [
                    {
                        "name": name,
                        "model": name,
                        "size": 5137025024,
                        "digest": "2ae6f6dd7a3dd734790bbbf58b8909a606e0e7e97e94b7604e0aa7ae4490e6d8",
                        "details": {"format": "gguf", "family": "llama", "families": ["llama"]},
                        "expires_at": expires,
                        "size_vram": 5137025024,
                        "context_length": 4096,
                    }
                    for name in self.loaded
                ]
            }
        )

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.0"})
