"""How an mlxgate process ends: signals, the drain's waits, and the exit.

Shared by the one-process server (``mlxgate_cli/serve.py``), the parent of
``serve --workers`` (``mlxgate_cli/workers.py``) and each HTTP worker
(``mlxgate_cli/worker.py``), so none of them imports another for these.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Awaitable

log = logging.getLogger(__name__)

#: After the drain (or on a failed start), how long stopping may still wait.
STOP_TIMEOUT = 2.0


class Signals:
    """The first of ``signums`` sets ``stop``, a second one ``hurry``."""

    def __init__(self, signums: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in signums:
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            log.warning("%s again: ending the requests in flight now", sig.name)
            self.hurry.set()
        self.stop.set()


async def first_done(*aws: Awaitable) -> None:
    """Wait until the first of ``aws`` ends (drained, or told to hurry), then
    cancel the others and let them finish cancelling."""
    waiters = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


def run_loop(main_coro) -> None:
    """Run the server on uvloop where it is installed (a faster event loop for
    the HTTP front and the upstream clients; grpc.aio runs on it), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coro)
        return
    uvloop.run(main_coro)


def exit_now(status: int) -> None:
    """End the process once its shutdown is complete (servers stopped, streams
    cancelled, models freed), skipping interpreter finalization, where
    grpc.aio's background thread can abort the process ("terminate called
    without an active exception", grpc/grpc#38679; seen here about 1 exit in
    15 on a loaded machine), so a supervisor sees the status it was meant to
    (0 for a clean stop)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
