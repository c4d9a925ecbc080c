"""Ollama REST routes: thin handlers over ``translate`` and the inference client.

Model management (pull, create, copy, delete, blobs; push refused with 501)
has its handlers and route rows in ``gateway/ollama/manage.py``.  No file
path is ever built from request data.
"""

from __future__ import annotations

from typing import Any, Iterable

from aiohttp import web

from gateway import generation, overhead
from gateway.events import collect, is_done
from gateway.generation import Renderer
from gateway.ollama import manage
from gateway.ollama import translate as tr
from gateway.parsing import read_json
from gateway.render import json_response
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import BACKEND_HEADER, client, request_id
from gateway.streaming import NDJSON, ndjson_frame
from gateway.times import duration
from mlxgate.dialects import ollama as wire
from mlxgate.v1 import inference_pb2 as pb


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running", content_type="text/plain")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": tr.OLLAMA_COMPAT_VERSION})


class _Answer(Renderer):
    """/api/generate and /api/chat: a line per chunk with something in it, the Done's fields last."""

    media_type = NDJSON
    dialect = "ollama"
    frame = staticmethod(ndjson_frame)

    def __init__(self, p: tr.Parsed, chat: bool) -> None:
        self.model, self.chat = p.model, chat
        self.events: list[pb.GenerateResponse] = []

    def event(self, index: int, ev: pb.GenerateResponse) -> Iterable[dict[str, Any]]:
        if is_done(ev):
            return (tr.chat_final(self.model, ev.done) if self.chat else tr.generate_final(self.model, ev.done),)
        ch = ev.chunk
        if not (ch.text or ch.thinking or ch.tool_calls or ch.logprobs):
            return ()
        return (tr.chat_chunk(self.model, ch) if self.chat else tr.generate_chunk(self.model, ch),)

    def take(self, index: int, ev: pb.GenerateResponse) -> None:
        self.events.append(ev)

    async def whole(self) -> Any:
        c = collect(self.events)
        if self.chat:
            return tr.chat_final(self.model, c.done, c.text, c.tool_calls, c.logprobs, c.thinking)
        return tr.generate_final(self.model, c.done, c.text, c.logprobs, c.thinking)


def _load_request(model: str, keep_alive: Any) -> pb.LoadModelRequest:
    req = pb.LoadModelRequest(model=model)
    ka = duration(keep_alive)
    if ka is not None:
        req.keep_alive.CopyFrom(ka)
    return req


async def _load_or_unload(request: web.Request, p: tr.Parsed, chat: bool) -> web.Response:
    c, rid = client(request), request_id(request)
    if p.keep_alive == 0:
        await c.unload_model(p.model, rid)
        return json_response(tr.load_answer(p.model, chat, unloaded=True))
    res = await c.load_model(_load_request(p.model, p.keep_alive), rid)
    return json_response(tr.load_answer(p.model, chat, unloaded=False), headers={BACKEND_HEADER: res.backend})


async def _generate(request: web.Request, p: tr.Parsed, chat: bool) -> web.StreamResponse:
    if p.load_only:
        return await _load_or_unload(request, p, chat)
    stream = client(request).generate(p.req, request_id(request), overhead.of(request))
    return await generation.run(request, [stream], _Answer(p, chat), p.stream)


async def generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, tr.generate_request(await read_json(request)), chat=False)


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, tr.chat_request(await read_json(request)), chat=True)


async def _embed(request: web.Request, p: tr.ParsedEmbed) -> tuple[pb.EmbedResponse | None, str]:
    c, rid = client(request), request_id(request)
    if not p.req.input:
        # Ollama: no input only loads the model.
        res = await c.load_model(_load_request(p.model, p.keep_alive), rid)
        return None, res.backend
    res = await c.embed(p.req, rid)
    return res, res.backend


async def embed(request: web.Request) -> web.Response:
    p = tr.embed_request(await read_json(request))
    res, backend = await _embed(request, p)
    body = tr.embed_response(p.model, res) if res is not None else {"model": p.model, "embeddings": []}
    return json_response(body, headers={BACKEND_HEADER: backend})


async def embeddings(request: web.Request) -> web.Response:
    """Legacy endpoint: one prompt, one vector."""
    p = tr.legacy_embeddings_request(await read_json(request))
    res, backend = await _embed(request, p)
    vec = list(res.embeddings[0].values) if res is not None and res.embeddings else []
    return json_response({"embedding": vec}, headers={BACKEND_HEADER: backend})


async def tags(request: web.Request) -> web.Response:
    res = await client(request).list_models(request_id(request))
    return json_response(tr.tags_response(res))


async def show(request: web.Request) -> web.Response:
    model = tr.show_request(await read_json(request))
    res = await client(request).show_model(model, request_id(request))
    return json_response(tr.show_response(res), headers={BACKEND_HEADER: res.model.backend})


async def ps(request: web.Request) -> web.Response:
    res = await client(request).list_running(request_id(request))
    return json_response(tr.ps_response(res))


_ANSWERED = "NDJSON lines (stream, the default) or one JSON object (stream=false)"

#: Every Ollama route: the app registers them, /openapi.json documents them.
ROUTES: list[Route] = [
    Route("GET", "/", root, "Health check", text="Ollama is running", calls_service=False),
    Route("HEAD", "/", root, "Health check", calls_service=False),
    Route("GET", "/api/version", version, "Server version", answer=wire.VersionResponse, calls_service=False,
          description=f"The Ollama version whose API these routes follow ({wire.VERSION})."),
    Route("HEAD", "/api/version", version, "Server version", calls_service=False),
    Route("POST", "/api/generate", generate, "Generate a completion", body=wire.GenerateRequest,
          answer=wire.GenerateResponse, stream="ndjson", stream_item=wire.GenerateResponse, description=_ANSWERED),
    Route("POST", "/api/chat", chat, "Generate a chat completion", body=wire.ChatRequest,
          answer=wire.ChatResponse, stream="ndjson", stream_item=wire.ChatResponse, description=_ANSWERED),
    Route("POST", "/api/embed", embed, "Generate embeddings", body=wire.EmbedRequest, answer=wire.EmbedResponse),
    Route("POST", "/api/embeddings", embeddings, "Generate an embedding (legacy)", body=wire.EmbeddingsRequest,
          answer=wire.EmbeddingsResponse),
    Route("GET", "/api/tags", tags, "List models", answer=wire.TagsResponse),
    Route("HEAD", "/api/tags", tags, "List models"),
    Route("POST", "/api/show", show, "Show model information", body=wire.ShowRequest, answer=wire.ShowResponse),
    Route("GET", "/api/ps", ps, "List running models", answer=wire.PsResponse),
    *manage.ROUTES,
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
