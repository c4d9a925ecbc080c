"""Ollama REST routes: thin handlers over ``translate`` and the inference client.

``/api/pull`` downloads a model through the service's PullModel; the rest of
model management (create, copy, delete, blobs; push refused with 501) has its
handlers in ``gateway/ollama/manage.py``.  No file path is ever built from
request data.
"""

from __future__ import annotations

from typing import Any, Iterable

from aiohttp import web

from gateway import generation, overhead
from gateway.errors import ApiError, adapt, ollama_body
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
from mlxgate.dialects import ollama_manage as mwire
from mlxgate.v1 import inference_pb2 as pb


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running", content_type="text/plain")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": tr.OLLAMA_COMPAT_VERSION})


class _NDJSON(Renderer):
    """Ollama's streams: one JSON object a line, an error as the last line."""

    media_type = NDJSON

    def frame(self, obj: Any) -> bytes:
        return ndjson_frame(obj)

    def error_frame(self, err: ApiError) -> bytes:
        return ndjson_frame(ollama_body(adapt(err, "ollama")))


class _Answer(_NDJSON):
    """/api/generate and /api/chat: a line per chunk with something in it, the Done's fields last."""

    def __init__(self, p: tr.Parsed, chat: bool) -> None:
        self.model, self.chat = p.model, chat

    def event(self, index: int, ev: pb.GenerateResponse) -> Iterable[dict[str, Any]]:
        if is_done(ev):
            return (tr.chat_final(self.model, ev.done) if self.chat else tr.generate_final(self.model, ev.done),)
        ch = ev.chunk
        if not (ch.text or ch.thinking or ch.tool_calls or ch.logprobs):
            return ()
        return (tr.chat_chunk(self.model, ch) if self.chat else tr.generate_chunk(self.model, ch),)

    async def whole(self, results: list[list[pb.GenerateResponse]]) -> Any:
        c = collect(results[0])
        if self.chat:
            return tr.chat_final(self.model, c.done, c.text, c.tool_calls, c.logprobs, c.thinking)
        return tr.generate_final(self.model, c.done, c.text, c.logprobs, c.thinking)


class _Progress(_NDJSON):
    """/api/pull: the progress lines, or one ``{"status": "success"}``; no backend to name."""

    def check(self, first: Any) -> None:
        pass

    def headers(self, ev: Any) -> dict[str, str]:
        return {}

    def event(self, index: int, ev: pb.PullModelResponse) -> Iterable[dict[str, Any]]:
        return (tr.progress_line(ev),)

    async def collect(self, stream: Any) -> list[Any]:
        async for _ in stream:  # read to the end, keeping nothing: a pull has many lines
            pass
        return []

    async def whole(self, results: list[list[pb.PullModelResponse]]) -> Any:
        return {"status": "success"}


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


async def pull(request: web.Request) -> web.StreamResponse:
    """Ollama's pull over PullModel: progress lines, or one ``{"status": "success"}``;
    a failure before the first line is a plain HTTP status."""
    req, streamed = tr.pull_request(await read_json(request))
    stream = client(request).pull_model(req, request_id(request))
    return await generation.run(request, [stream], _Progress(), streamed)


def manage_routes() -> list[Route]:
    """Model management: pull (here), the rest in ``gateway/ollama/manage.py``."""
    progress = "NDJSON progress lines (stream, the default) or the last one (stream=false)"
    return [
        Route("POST", "/api/pull", pull, "Pull a model", body=wire.PullRequest, answer=wire.ProgressResponse,
              stream="ndjson", stream_item=wire.ProgressResponse,
              description="From the Hugging Face Hub (HF_ENDPOINT): a catalog name, hf.co/<owner>/<repo>[:<revision>] "
                          "or <owner>/<repo>[:<revision>]. " + _ANSWERED),
        Route("POST", "/api/push", manage.push, "Push a model (unsupported)", unsupported=True,
              description=manage.PUSH_HELP),
        Route("POST", "/api/create", manage.create, "Create a model", body=mwire.CreateRequest,
              answer=mwire.Progress, stream="ndjson", stream_item=mwire.Progress, description=progress),
        Route("POST", "/api/copy", manage.copy, "Copy a model", body=mwire.CopyRequest),
        Route("DELETE", "/api/delete", manage.delete, "Delete a model", body=mwire.DeleteRequest),
        Route("HEAD", "/api/blobs/{digest}", manage.head_blob, "Check a blob", statuses=(404,)),
        Route("POST", "/api/blobs/{digest}", manage.post_blob, "Push a blob", statuses=(201,)),
    ]


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
    *manage_routes(),
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
