"""Draining a backend's event stream in tests."""

from __future__ import annotations

import contextlib


async def collect(agen) -> list:
    """Every event of an async generator, closing it whatever happens."""
    async with contextlib.aclosing(agen) as events:
        return [ev async for ev in events]
