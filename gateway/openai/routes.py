"""OpenAI REST routes under /v1: thin handlers over ``translate`` and the client.

Streams are SSE: ``data: {...}\\n\\n`` chunks, then ``data: [DONE]\\n\\n``.  An
error after the stream began is sent as ``data: {"error": {...}}\\n\\n`` and
the stream ends without ``[DONE]``.
"""

from __future__ import annotations

from typing import Any, Union

from aiohttp import web

from gateway import generation, overhead
from gateway.anthropic import routes as anthropic_routes
from gateway.errors import ApiError, openai_body, request_dialect
from gateway.events import collect
from gateway.generation import Renderer
from gateway.model_list import find_model
from gateway.openai import translate as tr
from gateway.parsing import read_json
from gateway.render import json_response
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import BACKEND_HEADER, client, request_id
from gateway.streaming import SSE_DONE, sse_frame
from mlxgate.dialects import anthropic as anthropic_wire
from mlxgate.dialects import openai as wire
from mlxgate.v1 import inference_pb2 as pb


class _Choices(Renderer):
    """Chat or text completion choices: chunks, the usage chunk, ``[DONE]``."""

    closing = SSE_DONE

    def __init__(self, p: tr.Parsed, chat: bool) -> None:
        self.p, self.chat = p, chat
        self.chunks = tr.ChatStream(p) if chat else tr.CompletionStream(p)

    def error_frame(self, err: ApiError) -> bytes:
        return sse_frame(openai_body(err))

    def event(self, index: int, ev: pb.GenerateResponse) -> list[dict[str, Any]]:
        return self.chunks.render((index, ev))

    async def tail(self) -> list[dict[str, Any]]:
        return self.chunks.tail()

    async def whole(self, results: list[list[pb.GenerateResponse]]) -> Any:
        done = [collect(events) for events in results]
        return tr.chat_completion(self.p, done) if self.chat else tr.completion(self.p, done)


async def _run(request: web.Request, p: tr.Parsed, chat: bool) -> web.StreamResponse:
    c, rid = client(request), request_id(request)
    streams = [c.generate(r, rid, overhead.of(request)) for r in p.requests()]
    return await generation.run(request, streams, _Choices(p, chat), p.stream)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _run(request, tr.chat_request(await read_json(request)), chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _run(request, tr.completion_request(await read_json(request)), chat=False)


async def embeddings(request: web.Request) -> web.Response:
    p = tr.embeddings_request(await read_json(request))
    res = await client(request).embed(p.req, request_id(request))
    return json_response(tr.embeddings_response(p, res), headers={BACKEND_HEADER: res.backend})


async def list_models(request: web.Request) -> web.Response:
    """OpenAI's list; Anthropic's (paged) for a client that sends
    ``anthropic-version``: both APIs serve this path."""
    if request_dialect(request) == "anthropic":
        return await anthropic_routes.list_models(request)
    res = await client(request).list_models(request_id(request))
    return json_response(tr.models_response(res))


async def retrieve_model(request: web.Request) -> web.Response:
    """The listed model of that id; ``x:latest`` (an Ollama-style name) finds
    ``x`` and is echoed as asked, as every answer echoes the requested name.
    Anthropic's shape for a client that sends ``anthropic-version``."""
    if request_dialect(request) == "anthropic":
        return await anthropic_routes.retrieve_model(request)
    name = request.match_info["model"]
    res = await client(request).list_models(request_id(request))
    match = find_model(res.models, name)
    if match is not None:
        return json_response({**tr.model_json(match), "id": name})
    raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


_FOR_ANTHROPIC = ("OpenAI's shape; with an anthropic-version header (every Anthropic client sends one), "
                  "Anthropic's shape, and errors in Anthropic's shape")
_MODEL_LIST = Union[wire.ModelList, anthropic_wire.ModelList]
_MODEL = Union[wire.Model, anthropic_wire.ModelInfo]

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
    Route("GET", "/v1/models", list_models, "List models", answer=_MODEL_LIST, query=anthropic_wire.ListModelsQuery,
          statuses=(400,), description=_FOR_ANTHROPIC + " (paged: limit, after_id, before_id)"),
    Route("GET", "/v1/models/{model:.+}", retrieve_model, "Retrieve a model", answer=_MODEL,
          description=_FOR_ANTHROPIC),
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
