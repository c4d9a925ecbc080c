"""Tokenize and detokenize routes: Ollama's ``/api/tokenize`` and ``/api/detokenize``
(errors in Ollama's shape) and vLLM's ``/tokenize`` and ``/detokenize`` (errors in
OpenAI's shape, as vLLM answers them)."""

from __future__ import annotations

from aiohttp import web

from gateway import image_urls
from gateway.imagefetch import read_json_fetching
from gateway.parsing import read_json
from gateway.render import json_response
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import BACKEND_HEADER, client, request_id
from gateway.tokenize import translate as tr
from mlxgate.dialects import tokenize as wire


async def ollama_tokenize(request: web.Request) -> web.Response:
    req = tr.ollama_tokenize_request(await read_json(request))
    res = await client(request).tokenize(req, request_id(request))
    return json_response(tr.ollama_tokenize_response(req.model, res), headers={BACKEND_HEADER: res.backend})


async def ollama_detokenize(request: web.Request) -> web.Response:
    req = tr.ollama_detokenize_request(await read_json(request))
    res = await client(request).detokenize(req, request_id(request))
    return json_response(tr.ollama_detokenize_response(req.model, res), headers={BACKEND_HEADER: res.backend})


async def tokenize(request: web.Request) -> web.Response:
    req, pieces = tr.tokenize_request(await read_json_fetching(request, image_urls.openai_chat))
    res = await client(request).tokenize(req, request_id(request))
    return json_response(tr.tokenize_response(res, pieces), headers={BACKEND_HEADER: res.backend})


async def detokenize(request: web.Request) -> web.Response:
    req = tr.detokenize_request(await read_json(request))
    res = await client(request).detokenize(req, request_id(request))
    return json_response(tr.detokenize_response(res), headers={BACKEND_HEADER: res.backend})


_MODEL_ONLY = ("Only for models this server runs itself (MLX) or another mlxgate service runs; a model only an "
               "upstream Ollama or a cloud API serves is 400. Ids outside the model's vocabulary are 400.")

#: Every tokenize route: the app registers them, /openapi.json documents them.
ROUTES: list[Route] = [
    Route("POST", "/api/tokenize", ollama_tokenize, "Tokenize text", body=wire.OllamaTokenizeRequest,
          answer=wire.OllamaTokenizeResponse, description=_MODEL_ONLY),
    Route("POST", "/api/detokenize", ollama_detokenize, "Detokenize token ids", body=wire.OllamaDetokenizeRequest,
          answer=wire.OllamaDetokenizeResponse, description=_MODEL_ONLY),
    Route("POST", "/tokenize", tokenize, "Tokenize a prompt or a chat (vLLM)", body=wire.TokenizeRequest,
          answer=wire.TokenizeResponse,
          description="messages are rendered with the model's chat template as a chat completion is, so count "
                      "is its prompt_tokens. " + _MODEL_ONLY),
    Route("POST", "/detokenize", detokenize, "Detokenize token ids (vLLM)", body=wire.DetokenizeRequest,
          answer=wire.DetokenizeResponse, description=_MODEL_ONLY),
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
