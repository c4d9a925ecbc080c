"""OpenAI REST routes under /v1: thin handlers over ``translate`` and the client.

Streams are SSE: ``data: {...}\\n\\n`` chunks, then ``data: [DONE]\\n\\n``.  An
error after the stream began is sent as ``data: {"error": {...}}\\n\\n`` and
the stream ends without ``[DONE]``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import generation, image_urls, overhead
from gateway.events import collect
from gateway.generation import Renderer
from gateway.imagefetch import read_json_fetching
from gateway.openai import translate as tr
from gateway.parsing import read_json
from gateway.render import json_response
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import BACKEND_HEADER, client, request_id
from gateway.streaming import SSE_DONE
from mlxgate.dialects import openai as wire
from mlxgate.v1 import inference_pb2 as pb


class _Choices(Renderer):
    """Chat or text completion choices: chunks, the usage chunk, ``[DONE]``."""

    closing = SSE_DONE

    def __init__(self, p: tr.Parsed, chat: bool) -> None:
        self.p, self.chat = p, chat
        self.chunks = tr.ChatStream(p) if chat else tr.CompletionStream(p)
        self.events: dict[int, list[pb.GenerateResponse]] = {}

    def event(self, index: int, ev: pb.GenerateResponse) -> list[dict[str, Any]]:
        return self.chunks.render((index, ev))

    async def tail(self) -> list[dict[str, Any]]:
        return self.chunks.tail()

    def take(self, index: int, ev: pb.GenerateResponse) -> None:
        self.events.setdefault(index, []).append(ev)

    async def whole(self) -> Any:
        done = [collect(self.events[i]) for i in sorted(self.events)]
        return tr.chat_completion(self.p, done) if self.chat else tr.completion(self.p, done)


async def _run(request: web.Request, p: tr.Parsed, chat: bool) -> web.StreamResponse:
    c, rid = client(request), request_id(request)
    streams = [c.generate(r, rid, overhead.of(request)) for r in p.requests()]
    return await generation.run(request, streams, _Choices(p, chat), p.stream)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _run(request, tr.chat_request(await read_json_fetching(request, image_urls.openai_chat)), chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _run(request, tr.completion_request(await read_json(request)), chat=False)


async def embeddings(request: web.Request) -> web.Response:
    p = tr.embeddings_request(await read_json(request))
    res = await client(request).embed(p.req, request_id(request))
    return json_response(tr.embeddings_response(p, res), headers={BACKEND_HEADER: res.backend})


_STREAMED = "one JSON object, or with stream=true server-sent events: data: <chunk>, then data: [DONE]"

#: Every OpenAI route: the app registers them, /openapi.json documents them.
ROUTES: list[Route] = [
    Route("POST", "/v1/chat/completions", chat_completions, "Create a chat completion",
          body=wire.ChatCompletionRequest, answer=wire.ChatCompletion, stream="sse",
          stream_item=wire.ChatCompletionChunk, description=_STREAMED),
    Route("POST", "/v1/completions", completions, "Create a completion", body=wire.CompletionRequest,
          answer=wire.Completion, stream="sse", stream_item=wire.Completion, description=_STREAMED),
    Route("POST", "/v1/embeddings", embeddings, "Create embeddings", body=wire.EmbeddingsRequest,
          answer=wire.EmbeddingList),
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
