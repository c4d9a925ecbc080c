"""OpenAI Responses routes: thin handlers over ``translate``, the client and the store.

``POST /v1/responses`` answers one Response object, or with ``stream: true``
server-sent events with names (``event: response.output_text.delta`` and
``data: {...}``), as OpenAI's API does: no ``[DONE]`` sentinel; the last event
is ``response.completed``, ``response.incomplete`` or, for a failure after the
stream began, ``response.failed`` (after an ``error`` event).  A failure
before the first token is an ordinary HTTP error, as on every route.

Stored responses (``store``, default true) are kept before the answer (or
the stream's last event) goes out, so a client may continue or fetch one as
soon as it has it.  ``GET``, ``DELETE`` and ``input_items`` read the store;
every id belongs to the API key that created it (``gateway/responses/store.py``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from gateway import generation, overhead
from gateway.errors import ApiError, bad_request, internal_error
from gateway.events import is_done
from gateway.generation import Renderer
from gateway.parsing import read_json, read_query
from gateway.render import json_response
from gateway.responses import translate as tr
from gateway.responses.store import BadCursor, BrokenChain, NotFound, ResponseStore, TooLong, Unavailable
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import caller_key, client, request_id
from gateway.streaming import event_frame
from mlxgate.dialects import responses as wire
from mlxgate.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

#: The app's store (``gateway.app.create_app`` makes it; closed with the app).
STORE_KEY = web.AppKey("responses_store", ResponseStore)


def store_of(request: web.Request) -> ResponseStore:
    return request.app[STORE_KEY]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def store_errors(handler: Handler) -> Handler:
    """The store failing is a 503 that says so (the details are in the log)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Unavailable as e:
            raise ApiError(503, f"the response store is unavailable ({e}; the server log says why); requests "
                                "with store: false and no previous_response_id do not need it") from None

    return wrapped


async def _owner(request: web.Request) -> str:
    return await store_of(request).owner(caller_key(request))


async def _history(request: web.Request, p: tr.Parsed, owner: str) -> list[dict[str, Any]]:
    prev = p.r.previous_response_id
    if prev is None:
        return []
    try:
        return await store_of(request).history(prev, owner)
    except NotFound:
        raise tr.not_found(prev, "previous_response_id") from None
    except BrokenChain as e:
        raise ApiError(
            404,
            f"the conversation of previous_response_id '{prev}' is incomplete: its earlier response "
            f"'{e.missing}' is no longer stored (removed to keep the store within its bounds, or deleted); "
            "start a new conversation, or send the whole history as input",
            param="previous_response_id",
            code="previous_response_not_found",
        ) from None
    except TooLong as e:
        raise bad_request(f"the conversation of previous_response_id is too long to continue ({e.what}); "
                          "start a new conversation", param="previous_response_id") from None


async def _save(request: web.Request, owner: str, response: dict[str, Any], p: tr.Parsed) -> None:
    """Keep a response (``store``); a failing store is logged, the answer still goes out."""
    if not p.store:
        return
    try:
        await store_of(request).save(owner, response, p.items)
    except Unavailable:
        log.error("responses store: could not store %s (request %s)", response["id"], request_id(request))


class _Response(Renderer):
    """One Response: the ``Assembler``'s named SSE events, or the Response
    object; kept in the store (``store``) before it goes out."""

    def __init__(self, request: web.Request, p: tr.Parsed, owner: str) -> None:
        self.request, self.p, self.owner = request, p, owner
        self.a = tr.Assembler(p, stream=p.stream)
        self._ending: Optional[tuple[list[dict[str, Any]], dict[str, Any]]] = None

    frame = staticmethod(event_frame)

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
        await _save(self.request, self.owner, final, self.p)
        return terminal

    def take(self, index: int, ev: pb.GenerateResponse) -> None:
        self.event(index, ev)

    async def whole(self) -> Any:
        assert self._ending is not None  # the driver's last event is a Done, or it raised
        await _save(self.request, self.owner, self._ending[1], self.p)
        return self._ending[1]


@store_errors
async def create(request: web.Request) -> web.StreamResponse:
    p = tr.create_request(await read_json(request))
    owner = ""
    if p.store or p.r.previous_response_id is not None:
        # Before generating: a store that cannot keep the answer is said at once (503).
        await store_of(request).ready()
        owner = await _owner(request)
    req = tr.generate_request(p, await _history(request, p, owner))
    stream = client(request).generate(req, request_id(request), overhead.of(request))
    response = _Response(request, p, owner)
    answer = await generation.run(request, [stream], response, p.stream)
    if response.a.failed is not None:  # a stream that failed is kept as failed
        await _save(request, owner, response.a.failed, p)
    return answer


def _response_id(request: web.Request) -> str:
    rid = request.match_info["response_id"]
    if len(rid) > wire.MAX_ID_CHARS:
        raise tr.not_found(rid)
    return rid


@store_errors
async def retrieve(request: web.Request) -> web.Response:
    rid = _response_id(request)
    body = await store_of(request).get(rid, await _owner(request))
    if body is None:
        raise tr.not_found(rid)
    return web.Response(body=tr.stored(body), content_type="application/json", charset="utf-8")


@store_errors
async def delete(request: web.Request) -> web.Response:
    rid = _response_id(request)
    if not await store_of(request).delete(rid, await _owner(request)):
        raise tr.not_found(rid)
    return json_response({"id": rid, "object": "response.deleted", "deleted": True})


@store_errors
async def input_items(request: web.Request) -> web.Response:
    rid = _response_id(request)
    q = read_query(request, wire.ListItemsQuery, "/v1/responses/{response_id}/input_items")
    try:
        page = await store_of(request).items(
            rid, await _owner(request), q.limit or wire.LIST_LIMIT_DEFAULT, q.order or "desc", q.after, q.before)
    except NotFound:
        raise tr.not_found(rid) from None
    except BadCursor as e:
        raise bad_request(f"{e.param}: no input item '{e.item_id}' in response '{rid}'", param=e.param) from None
    return json_response(tr.items_page(page.items, page.has_more))


_STREAMED = ("one Response object, or with stream=true server-sent events, each named by its type "
             "(event: response.created ... response.completed); no [DONE]")

#: Every Responses route: the app registers them, /openapi.json documents them.
ROUTES: list[Route] = [
    Route("POST", "/v1/responses", create, "Create a model response", body=wire.CreateRequest,
          answer=wire.Response, stream="sse", stream_item=wire.StreamEvent, event_names=True,
          description=_STREAMED),
    Route("GET", "/v1/responses/{response_id}", retrieve, "Retrieve a stored model response",
          answer=wire.Response, calls_service=False, statuses=(404,)),
    Route("DELETE", "/v1/responses/{response_id}", delete, "Delete a stored model response",
          answer=wire.DeletedResponse, calls_service=False, statuses=(404,)),
    Route("GET", "/v1/responses/{response_id}/input_items", input_items, "List a stored response's input items",
          answer=wire.ItemList, calls_service=False, query=wire.ListItemsQuery, statuses=(400, 404)),
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
