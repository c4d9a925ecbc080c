"""Rerank routes: ``POST /v1/rerank``, ``/rerank`` and ``/v2/rerank`` (vLLM's three paths, one shape).

Errors are OpenAI-shaped on all three (vLLM's own error body).
"""

from __future__ import annotations

from aiohttp import web

from gateway.parsing import read_json
from gateway.render import json_response
from gateway.rerank import translate as tr
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import BACKEND_HEADER, client, request_id
from mlxgate.dialects import rerank as wire


async def rerank(request: web.Request) -> web.Response:
    p = tr.rerank_request(await read_json(request), request.path)
    res = await client(request).rerank(p.req, request_id(request))
    return json_response(tr.rerank_response(p, res), headers={BACKEND_HEADER: res.backend})


_DESCRIPTION = (
    "Jina/Cohere-compatible (vLLM's shape). Results are sorted by relevance_score, highest first, at most top_n. "
    "MLX: a causal model scores by the probability of \"yes\" after a judging prompt (Qwen3-Reranker's format), "
    "an embedding model by cosine similarity mapped onto [0, 1]; documents are scored in batches.")

#: Every rerank route: the app registers them, /openapi.json documents them.
ROUTES: list[Route] = [
    Route("POST", path, rerank, "Rerank documents by relevance to a query", body=wire.RerankRequest,
          answer=wire.RerankResponse, description=_DESCRIPTION)
    for path in ("/v1/rerank", "/rerank", "/v2/rerank")
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
