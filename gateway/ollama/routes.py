"""Ollama REST routes: thin handlers over ``translate`` and the inference client.

``/api/pull`` downloads a model through the service's PullModel; the rest of
model management (create, copy, delete, blobs; push refused with 501) has its
handlers in ``gateway/ollama/manage.py``.  No file path is ever built from
request data.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

from aiohttp import web

from gateway import overhead
from gateway.errors import ApiError, adapt, ollama_body
from gateway.events import first_event, is_done
from gateway.ollama import manage
from gateway.ollama import translate as tr
from gateway.parsing import read_json
from gateway.render import json_response
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import BACKEND_HEADER, backend_header, client, request_id
from gateway.streaming import NDJSON, ndjson_frame, open_stream, pump, with_first
from gateway.times import duration
from mlxgate.dialects import ollama as wire
from mlxgate.dialects import ollama_manage as mwire
from mlxgate.v1 import inference_pb2 as pb



async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running", content_type="text/plain")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": tr.OLLAMA_COMPAT_VERSION})


def _error_frame(err: ApiError) -> bytes:
    return ndjson_frame(ollama_body(adapt(err, "ollama")))


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
    rid = request_id(request)
    stream = client(request).generate(p.req, rid, overhead.of(request))
    try:
        first = await first_event(stream)  # a failure before any token is a plain HTTP error
        if p.stream:
            # Fallback happens only before the first event, so its backend is final.
            resp = await open_stream(request, NDJSON, backend_header(first))

            def render(ev: pb.GenerateResponse) -> Iterable[dict[str, Any]]:
                if is_done(ev):
                    yield tr.chat_final(p.model, ev.done) if chat else tr.generate_final(p.model, ev.done)
                else:
                    ch = ev.chunk
                    if ch.text or ch.thinking or ch.tool_calls or ch.logprobs:
                        yield tr.chat_chunk(p.model, ch) if chat else tr.generate_chunk(p.model, ch)

            if await pump(resp, with_first(first, stream), render, ndjson_frame, _error_frame, rid):
                with contextlib.suppress(ConnectionResetError):  # the client left after the last line
                    await resp.write_eof()
            return resp

        text: list[str] = []
        thinking: list[str] = []
        calls: list[pb.ToolCall] = []
        lps: list[pb.TokenLogprob] = []
        done = pb.Done()
        async for ev in with_first(first, stream):
            if is_done(ev):
                done = ev.done
            else:
                ch = ev.chunk
                text.append(ch.text)
                thinking.append(ch.thinking)
                calls.extend(ch.tool_calls)
                lps.extend(ch.logprobs)
        if chat:
            body: Any = tr.chat_final(p.model, done, "".join(text), calls, lps, "".join(thinking))
        else:
            body = tr.generate_final(p.model, done, "".join(text), lps, "".join(thinking))
        return json_response(body, headers={BACKEND_HEADER: done.backend})
    finally:
        stream.cancel()


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
    rid = request_id(request)
    stream = client(request).pull_model(req, rid)
    try:
        first = await stream.start()
        if not streamed:
            async for _ in stream:
                pass
            return json_response({"status": "success"})
        resp = await open_stream(request, NDJSON)
        if await pump(resp, with_first(first, stream), lambda p: (tr.progress_line(p),), ndjson_frame,
                      _error_frame, rid):
            with contextlib.suppress(ConnectionResetError):
                await resp.write_eof()
        return resp
    finally:
        stream.cancel()



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
