"""What every fake upstream shares: an aiohttp app served on 127.0.0.1:0."""

from __future__ import annotations

from typing import Optional

from aiohttp import web


class LoopbackServer:
    """Mixin: subclasses define ``app()``; ``start`` binds a free port."""

    port: int = 0
    _runner: Optional[web.AppRunner] = None

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
