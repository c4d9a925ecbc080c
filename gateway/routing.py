"""The route table's row: one HTTP operation, what it reads and what it answers.

Each dialect's ``routes.py`` lists its operations as ``Route``s (with the
rows of a module beside it: ``ollama/manage.py``, ``responses/stored.py``;
``model_list.py`` has the ``/v1/models`` pair two dialects share); the app
registers them and ``gateway/openapi.py`` documents them from the same rows
(request body = the dialect's request model, answer = its response
``TypedDict``, streams by their item schema), so the document cannot list a
route the app lacks, nor miss one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Optional

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    #: The request body's model (a ``WireModel``); None: no body.
    body: Any = None
    #: The 200 answer's JSON shape (a ``TypedDict``); None: no JSON answer.
    answer: Any = None
    #: "ndjson" or "sse": the answer may also be a stream of ``stream_item``s.
    stream: Optional[Literal["ndjson", "sse"]] = None
    stream_item: Any = None
    #: A text/plain answer (``GET /``).
    text: Optional[str] = None
    #: Whether the operation calls the inference service (its error statuses apply).
    calls_service: bool = True
    #: Never answers 200 (model management: always 501).
    unsupported: bool = False
    description: str = ""
    #: SSE events carry their name (``event: <the data's type>``, OpenAI's
    #: Responses API) and there is no ``[DONE]``.
    event_names: bool = False
    #: The query string's model (a ``WireModel``): documented as parameters.
    query: Any = None
    #: Statuses the operation may answer besides the ones its kind implies
    #: (a stored object's id: 404).
    statuses: tuple[int, ...] = ()


def add_routes(app: web.Application, routes: list[Route]) -> None:
    for r in routes:
        app.router.add_route(r.method, r.path, r.handler)
