"""OpenAI Responses routes: ``create`` over ``translate``, the client and the
driver; the routes that read stored responses are in ``stored.py``.

``POST /v1/responses`` answers one Response object, or with ``stream: true``
server-sent events with names (``event: response.output_text.delta`` and
``data: {...}``), as OpenAI's API does: no ``[DONE]`` sentinel; the last event
is ``response.completed``, ``response.incomplete`` or, for a failure after the
stream began, ``response.failed`` (after an ``error`` event).  A failure
before the first token is an ordinary HTTP error, as on every route.

Stored responses (``store``, default true) are kept before the answer (or
the stream's last event) goes out, so a client may continue or fetch one as
soon as it has it; a stream that failed is kept as failed.
"""

from __future__ import annotations

from typing import Any, Optional

from aiohttp import web

from gateway import generation, image_urls, overhead
from gateway.errors import ApiError, internal_error
from gateway.events import is_done
from gateway.generation import Renderer
from gateway.imagefetch import read_json_fetching
from gateway.responses import stored
from gateway.responses import translate as tr
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import client, request_id
from gateway.streaming import event_frame
from mlxgate.dialects import responses as wire
from mlxgate.v1 import inference_pb2 as pb


class _Response(Renderer):
    """One Response: the ``Assembler``'s named SSE events, or the Response
    object; kept in the store (``store``) before it goes out."""

    frame = staticmethod(event_frame)

    def __init__(self, request: web.Request, p: tr.Parsed, owner: str) -> None:
        self.request, self.p, self.owner = request, p, owner
        self.a = tr.Assembler(p, stream=p.stream)
        self._ending: Optional[tuple[list[dict[str, Any]], dict[str, Any]]] = None

    def error_frame(self, err: ApiError) -> bytes:
        return b"".join(event_frame(e) for e in self.a.fail(err))

    def start(self) -> list[dict[str, Any]]:
        return self.a.start()

    def event(self, index: int, ev: pb.GenerateResponse) -> list[dict[str, Any]]:
        if is_done(ev):
            out, terminal, final = self.a.finish(ev.done)
            self._ending = terminal, final
            return out
        return self.a.feed(ev.chunk)

    async def tail(self) -> list[dict[str, Any]]:
        if self._ending is None:  # the service broke the contract (no Done): a failure
            raise internal_error(request_id(self.request))
        terminal, final = self._ending
        await stored.save(self.request, self.owner, final, self.p)
        return terminal

    def take(self, index: int, ev: pb.GenerateResponse) -> None:
        self.event(index, ev)

    async def whole(self) -> Any:
        assert self._ending is not None  # the driver's last event is a Done, or it raised
        await stored.save(self.request, self.owner, self._ending[1], self.p)
        return self._ending[1]


@stored.store_errors
async def create(request: web.Request) -> web.StreamResponse:
    p = tr.create_request(await read_json_fetching(request, image_urls.responses))
    owner = ""
    if p.store or p.r.previous_response_id is not None:
        # Before generating: a store that cannot keep the answer is said at once (503).
        await stored.store_of(request).ready()
        owner = await stored.owner_of(request)
    req = tr.generate_request(p, await stored.history(request, p, owner))
    stream = client(request).generate(req, request_id(request), overhead.of(request))
    response = _Response(request, p, owner)
    answer = await generation.run(request, [stream], response, p.stream)
    if response.a.failed is not None:  # a stream that failed is kept as failed
        await stored.save(request, owner, response.a.failed, p)
    return answer


_STREAMED = ("one Response object, or with stream=true server-sent events, each named by its type "
             "(event: response.created ... response.completed); no [DONE]")

#: Every Responses route: the app registers them, /openapi.json documents them.
ROUTES: list[Route] = [
    Route("POST", "/v1/responses", create, "Create a model response", body=wire.CreateRequest,
          answer=wire.Response, stream="sse", stream_item=wire.StreamEvent, event_names=True,
          description=_STREAMED),
    *stored.ROUTES,
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
