"""Graceful shutdown of the HTTP front.

``Drain`` is the app's shutdown state (``DRAIN_KEY``); ``drain_middleware``
reads it.  Once ``begin()`` is called (SIGTERM/SIGINT), every new request
gets 503 with ``Retry-After`` in its dialect's shape (``/metrics`` still
answers, so a scraper can watch the drain); requests already in flight,
streams included, go on.  ``wait_idle`` waits for them; after the grace
period the caller ends what is left through ``InferenceClient.end_calls()``,
which makes every open stream end with its dialect's error line.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Optional

from aiohttp import web

from gateway.errors import ApiError, error_response, request_dialect

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Seconds a refused caller is told to wait (a restart usually takes about this long).
RETRY_AFTER_SECONDS = 5

#: Paths still served while draining.
_OPEN_WHILE_DRAINING = frozenset({"/metrics"})


class Drain:
    """Whether the front is draining, and how many requests are in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.draining = True

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: Optional[float]) -> bool:
        """Wait until no request is in flight; False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


DRAIN_KEY = web.AppKey("drain", Drain)


def shutting_down_error() -> ApiError:
    return ApiError(
        503,
        "server shutting down; retry shortly",
        code="server_shutting_down",
        retry_after=str(RETRY_AFTER_SECONDS),
    )


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    drain = request.app[DRAIN_KEY]
    if request.path in _OPEN_WHILE_DRAINING:
        return await handler(request)
    if drain.draining:
        response = error_response(shutting_down_error(), request_dialect(request))
        response.force_close()  # no keep-alive into a server that is going away
        return response
    drain.enter()
    try:
        return await handler(request)
    finally:
        drain.leave()
