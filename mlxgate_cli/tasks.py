"""Small asyncio helpers the process code shares."""

from __future__ import annotations

import asyncio
from typing import Awaitable


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
