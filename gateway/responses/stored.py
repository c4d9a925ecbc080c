"""Stored responses as the routes use them: the app's store, whose key owns
what, a conversation's history, keeping an answer, and the routes that read
the store (``GET``, ``DELETE``, ``input_items``).

Every id belongs to the API key that created it; the store itself (SQLite,
bounded) is ``gateway/responses/store.py``.  Its failures are a 503 that
says so (the details are in the log).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from gateway.errors import ApiError, bad_request
from gateway.parsing import read_query
from gateway.render import json_response
from gateway.responses import translate as tr
from gateway.responses.store import BadCursor, BrokenChain, NotFound, ResponseStore, TooLong, Unavailable
from gateway.routing import Route
from gateway.state import caller_key, request_id
from mlxgate.dialects import responses as wire

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


async def owner_of(request: web.Request) -> str:
    return await store_of(request).owner(caller_key(request))


async def history(request: web.Request, p: tr.Parsed, owner: str) -> list[dict[str, Any]]:
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


async def save(request: web.Request, owner: str, response: dict[str, Any], p: tr.Parsed) -> None:
    """Keep a response (``store``); a failing store is logged, the answer still goes out."""
    if not p.store:
        return
    try:
        await store_of(request).save(owner, response, p.items)
    except Unavailable:
        log.error("responses store: could not store %s (request %s)", response["id"], request_id(request))


def _response_id(request: web.Request) -> str:
    rid = request.match_info["response_id"]
    if len(rid) > wire.MAX_ID_CHARS:
        raise tr.not_found(rid)
    return rid


@store_errors
async def retrieve(request: web.Request) -> web.Response:
    rid = _response_id(request)
    body = await store_of(request).get(rid, await owner_of(request))
    if body is None:
        raise tr.not_found(rid)
    return web.Response(body=tr.stored(body), content_type="application/json", charset="utf-8")


@store_errors
async def delete(request: web.Request) -> web.Response:
    rid = _response_id(request)
    if not await store_of(request).delete(rid, await owner_of(request)):
        raise tr.not_found(rid)
    return json_response({"id": rid, "object": "response.deleted", "deleted": True})


@store_errors
async def input_items(request: web.Request) -> web.Response:
    rid = _response_id(request)
    q = read_query(request, wire.ListItemsQuery, "/v1/responses/{response_id}/input_items")
    try:
        page = await store_of(request).items(
            rid, await owner_of(request), q.limit or wire.LIST_LIMIT_DEFAULT, q.order or "desc", q.after, q.before)
    except NotFound:
        raise tr.not_found(rid) from None
    except BadCursor as e:
        raise bad_request(f"{e.param}: no input item '{e.item_id}' in response '{rid}'", param=e.param) from None
    return json_response(tr.items_page(page.items, page.has_more))


#: The routes over the store (in the Responses table).
ROUTES: list[Route] = [
    Route("GET", "/v1/responses/{response_id}", retrieve, "Retrieve a stored model response",
          answer=wire.Response, calls_service=False, statuses=(404,)),
    Route("DELETE", "/v1/responses/{response_id}", delete, "Delete a stored model response",
          answer=wire.DeletedResponse, calls_service=False, statuses=(404,)),
    Route("GET", "/v1/responses/{response_id}/input_items", input_items, "List a stored response's input items",
          answer=wire.ItemList, calls_service=False, query=wire.ListItemsQuery, statuses=(400, 404)),
]
