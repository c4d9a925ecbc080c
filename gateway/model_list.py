"""``GET /v1/models`` and ``GET /v1/models/{model}``: one path, two dialects.

OpenAI's and Anthropic's APIs both serve these paths.  A request that
carries ``anthropic-version`` (every Anthropic SDK sends it, no OpenAI
client does) gets Anthropic's shapes and errors (``errors.request_dialect``);
any other gets OpenAI's.  Both read the same model list; a name is found as
a request names it (``find_model``) and echoed as asked.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

from aiohttp import web

from gateway.anthropic import translate as anthropic_tr
from gateway.errors import ApiError, request_dialect
from gateway.openai import translate as openai_tr
from gateway.parsing import read_query
from gateway.render import json_response
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import client, request_id
from mlxgate.dialects import anthropic as anthropic_wire
from mlxgate.dialects import openai as openai_wire
from mlxgate.names import same_model
from mlxgate.v1 import inference_pb2 as pb


def find_model(models: Iterable[pb.ModelInfo], name: str) -> Optional[pb.ModelInfo]:
    """The listed model called ``name``: that exact name first, else one it
    names Ollama-style (``x:latest`` finds ``x``)."""
    models = list(models)
    return next((m for m in models if m.name == name), None) or next(
        (m for m in models if same_model(m.name, name)), None)


async def list_models(request: web.Request) -> web.Response:
    """OpenAI's list, or Anthropic's (paged by ``limit``, ``after_id``, ``before_id``)."""
    anthropic = request_dialect(request) == "anthropic"
    q = read_query(request, anthropic_wire.ListModelsQuery, "/v1/models") if anthropic else None
    res = await client(request).list_models(request_id(request))
    if q is not None:
        return json_response(anthropic_tr.models_page(list(res.models), q))
    return json_response(openai_tr.models_response(res))


async def retrieve_model(request: web.Request) -> web.Response:
    """The listed model of that id; ``x:latest`` (an Ollama-style name) finds
    ``x`` and is echoed as asked, as every answer echoes the requested name."""
    name = request.match_info["model"]
    res = await client(request).list_models(request_id(request))
    match = find_model(res.models, name)
    if request_dialect(request) == "anthropic":
        if match is None:
            raise ApiError(404, f"model: {name}", param="model")
        return json_response(anthropic_tr.model_info(match, name))
    if match is None:
        raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
    return json_response({**openai_tr.model_json(match), "id": name})


_FOR_ANTHROPIC = ("OpenAI's shape; with an anthropic-version header (every Anthropic client sends one), "
                  "Anthropic's shape, and errors in Anthropic's shape")

#: Both model routes: the app registers them, /openapi.json documents them (with OpenAI's).
ROUTES: list[Route] = [
    Route("GET", "/v1/models", list_models, "List models",
          answer=Union[openai_wire.ModelList, anthropic_wire.ModelList], query=anthropic_wire.ListModelsQuery,
          statuses=(400,), description=_FOR_ANTHROPIC + " (paged: limit, after_id, before_id)"),
    Route("GET", "/v1/models/{model:.+}", retrieve_model, "Retrieve a model",
          answer=Union[openai_wire.Model, anthropic_wire.ModelInfo], description=_FOR_ANTHROPIC),
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
