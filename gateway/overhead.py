"""mlxgate's own time per request, as a response header and a metric.

The service sends, with every event, how long it has waited on the backend
(``GenerateResponse.backend_seconds``: the MLX engine, or the upstream with its
adapter).  The front's time from taking the request to sending the response's
first byte, minus that wait, is what mlxgate added: parsing, the trust checks,
the channel to the service, validation, routing, rendering.  For a streamed
answer it is the overhead on the time to first token (settled when the
headers go out); for a whole answer, on the whole request (settled when the
handler returns it).  Only requests that generate (chat, completions,
messages, responses) have it; with several choices (OpenAI ``n``) the longest
backend wait counts.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable, Optional

from aiohttp import web

#: Response header: the overhead in milliseconds.
HEADER = "x-mlxgate-overhead-ms"


class Overhead:
    __slots__ = ("started", "backend_s", "seconds")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        #: The backend's wait so far (None: no generation in this request).
        self.backend_s: Optional[float] = None
        self.seconds: Optional[float] = None

    def backend(self, seconds: float) -> None:
        if self.backend_s is None or seconds > self.backend_s:
            self.backend_s = seconds

    def settle(self) -> Optional[float]:
        """The overhead, fixed the first time it is asked for (the header and
        the metric then agree); None when the request generated nothing."""
        if self.seconds is None and self.backend_s is not None:
            self.seconds = max(0.0, time.perf_counter() - self.started - self.backend_s)
        return self.seconds


KEY = web.RequestKey("mlxgate.overhead", Overhead)


def of(request: web.Request) -> Optional[Overhead]:
    return request.get(KEY)


@web.middleware
async def middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request[KEY] = Overhead()
    return await handler(request)


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    o = of(request)
    seconds = o.settle() if o is not None else None
    if seconds is not None:
        response.headers[HEADER] = f"{seconds * 1000:.3f}"
