"""Ollama REST routes: thin handlers over ``translate`` and the inference client.

Model management (pull, push, create, copy, delete, blobs) is answered with
501 and a message saying how models get here: mlxgate serves MLX model
folders from its models directory and, through an upstream Ollama, whatever
that Ollama has.  No file path is ever built from request data.
"""

from __future__ import annotations

from typing import Any, Iterable

from aiohttp import web

from backends.types import Chunk, Done, Event, TokenLogprob, ToolCall, keep_alive_to_pb
from gateway.errors import ApiError, adapt, ollama_body
from gateway.fields import read_json
from gateway.ollama import translate as tr
from gateway.state import BACKEND_HEADER, backend_header, client, request_id
from gateway.streaming import NDJSON, ndjson_frame, open_stream, pump, with_first
from mlxgate.v1 import inference_pb2 as pb

MODEL_MANAGEMENT_HELP = (
    "mlxgate does not pull, push, create, copy or delete models. To add a model, put an MLX model "
    "folder (config.json, *.safetensors, tokenizer files) in the models directory (mlx.models_dir, "
    "env MLXGATE_MODELS_DIR), or configure an upstream Ollama (ollama.upstream, env OLLAMA_UPSTREAM) "
    "and manage models there."
)


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running", content_type="text/plain")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": tr.OLLAMA_COMPAT_VERSION})


def _error_frame(err: ApiError) -> bytes:
    return ndjson_frame(ollama_body(adapt(err, "ollama")))


async def _load_or_unload(request: web.Request, p: tr.Parsed, chat: bool) -> web.Response:
    c, rid = client(request), request_id(request)
    if p.keep_alive == 0:
        await c.unload_model(p.model, rid)
        return web.json_response(tr.load_answer(p.model, chat, unloaded=True))
    req = pb.LoadModelRequest(model=p.model)
    ka = keep_alive_to_pb(p.keep_alive)
    if ka is not None:
        req.keep_alive.CopyFrom(ka)
    res = await c.load_model(req, rid)
    return web.json_response(tr.load_answer(p.model, chat, unloaded=False), headers={BACKEND_HEADER: res.backend})


async def _generate(request: web.Request, p: tr.Parsed, chat: bool) -> web.StreamResponse:
    if p.load_only:
        return await _load_or_unload(request, p, chat)
    rid = request_id(request)
    stream = client(request).generate(p.req, rid)
    try:
        first = await stream.start()
        if isinstance(first, Done):
            tr.check_done(first)  # a failure before any token is a plain HTTP error
        if p.stream:
            # Fallback happens only before the first event, so its backend is final.
            resp = await open_stream(request, NDJSON, backend_header(first))

            def render(ev: Event) -> Iterable[dict[str, Any]]:
                if isinstance(ev, Done):
                    yield tr.chat_final(p.model, ev) if chat else tr.generate_final(p.model, ev)
                elif ev.text or ev.thinking or ev.tool_calls or ev.logprobs:
                    yield tr.chat_chunk(p.model, ev) if chat else tr.generate_chunk(p.model, ev)

            if await pump(resp, with_first(first, stream), render, ndjson_frame, _error_frame, rid):
                await resp.write_eof()
            return resp

        text: list[str] = []
        thinking: list[str] = []
        calls: list[ToolCall] = []
        lps: list[TokenLogprob] = []
        done = Done()
        async for ev in with_first(first, stream):
            if isinstance(ev, Chunk):
                text.append(ev.text)
                thinking.append(ev.thinking)
                calls.extend(ev.tool_calls)
                lps.extend(ev.logprobs)
            else:
                done = ev
        if chat:
            body = tr.chat_final(p.model, done, "".join(text), calls, lps, "".join(thinking))
        else:
            body = tr.generate_final(p.model, done, "".join(text), lps, "".join(thinking))
        return web.json_response(body, headers={BACKEND_HEADER: done.backend})
    finally:
        stream.cancel()


async def generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, tr.generate_request(await read_json(request)), chat=False)


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, tr.chat_request(await read_json(request)), chat=True)


async def _embed(request: web.Request, p: tr.ParsedEmbed) -> tuple[pb.EmbedResponse | None, str]:
    c, rid = client(request), request_id(request)
    if not p.req.inputs:
        # Ollama: no input only loads the model.
        req = pb.LoadModelRequest(model=p.model)
        ka = keep_alive_to_pb(p.keep_alive)
        if ka is not None:
            req.keep_alive.CopyFrom(ka)
        res = await c.load_model(req, rid)
        return None, res.backend
    res = await c.embed(p.req.to_pb(), rid)
    return res, res.backend


async def embed(request: web.Request) -> web.Response:
    p = tr.embed_request(await read_json(request))
    res, backend = await _embed(request, p)
    body = tr.embed_response(p.model, res) if res is not None else {"model": p.model, "embeddings": []}
    return web.json_response(body, headers={BACKEND_HEADER: backend})


async def embeddings(request: web.Request) -> web.Response:
    """Legacy endpoint: one prompt, one vector."""
    p = tr.legacy_embeddings_request(await read_json(request))
    res, backend = await _embed(request, p)
    vec = list(res.embeddings[0].values) if res is not None and res.embeddings else []
    return web.json_response({"embedding": vec}, headers={BACKEND_HEADER: backend})


async def tags(request: web.Request) -> web.Response:
    res = await client(request).list_models(request_id(request))
    return web.json_response(tr.tags_response(res))


async def show(request: web.Request) -> web.Response:
    model = tr.show_request(await read_json(request))
    res = await client(request).show_model(model, request_id(request))
    return web.json_response(tr.show_response(res), headers={BACKEND_HEADER: res.model.backend})


async def ps(request: web.Request) -> web.Response:
    res = await client(request).list_running(request_id(request))
    return web.json_response(tr.ps_response(res))


async def unsupported(request: web.Request) -> web.Response:
    raise ApiError(501, f"{request.path}: {MODEL_MANAGEMENT_HELP}")


#: (method, path, handler) for every Ollama route; openapi.py documents the same set.
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/", root),
    ("HEAD", "/", root),
    ("GET", "/api/version", version),
    ("HEAD", "/api/version", version),
    ("POST", "/api/generate", generate),
    ("POST", "/api/chat", chat),
    ("POST", "/api/embed", embed),
    ("POST", "/api/embeddings", embeddings),
    ("GET", "/api/tags", tags),
    ("HEAD", "/api/tags", tags),
    ("POST", "/api/show", show),
    ("GET", "/api/ps", ps),
    ("POST", "/api/pull", unsupported),
    ("POST", "/api/push", unsupported),
    ("POST", "/api/create", unsupported),
    ("POST", "/api/copy", unsupported),
    ("DELETE", "/api/delete", unsupported),
    ("HEAD", "/api/blobs/{digest}", unsupported),
    ("POST", "/api/blobs/{digest}", unsupported),
]


def add_routes(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
