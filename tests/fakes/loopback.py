"""What every fake upstream shares: an aiohttp app served on 127.0.0.1:0, and
a bounded way to hold a request (the hung-upstream faults)."""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence

from aiohttp import web

#: How often a held request looks whether its client is still there, seconds.
POLL_S = 0.02


def client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def hold(
    request: web.Request,
    seconds: float,
    resp: Optional[web.StreamResponse] = None,
    keepalive: Sequence[bytes] = (),
    interval: float = 0.0,
) -> bool:
    """Keep ``request`` waiting for ``seconds`` -- never longer -- writing the
    ``keepalive`` lines in turn every ``interval`` seconds (the first at once)
    when ``resp`` has been prepared.  False as soon as the client is gone."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    next_line = loop.time()
    i = 0
    while True:
        if client_gone(request):
            return False
        now = loop.time()
        if now >= end:
            return True
        if resp is not None and keepalive and interval > 0 and now >= next_line:
            try:
                await resp.write(keepalive[i % len(keepalive)])
            except (ConnectionError, RuntimeError):
                return False
            i += 1
            next_line = now + interval
        await asyncio.sleep(min(POLL_S, max(0.0, end - now)))


class LoopbackServer:
    """Mixin: subclasses define ``app()``; ``start`` binds a free port."""

    port: int = 0
    _runner: Optional[web.AppRunner] = None
    #: Set by the subclass (``__post_init__``): clients that went away in the
    #: middle of a request, counted, and the event of the first.
    disconnects: int = 0
    disconnected: asyncio.Event

    def client_left(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    def app(self) -> web.Application:  # pragma: no cover - abstract
        raise NotImplementedError

    async def serve(self) -> None:
        # The fakes watch disconnects themselves, so aiohttp must not cancel
        # their handlers first.
        self._runner = web.AppRunner(self.app(), handler_cancellation=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
