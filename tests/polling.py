"""Waiting for a condition instead of sleeping a guessed time before an assertion.

``await eventually(lambda: x == 1, what="...")`` checks the condition every
20 ms and returns as soon as it holds; ``timeout`` only bounds a test that
would otherwise hang (it is no claim about speed: make it generous).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable

POLL_S = 0.02


async def eventually(condition: Callable[[], Any], timeout: float = 30.0, what: str = "the condition") -> float:
    """Return once ``condition()`` (a plain or async function) is true, with the
    seconds it took (for a printed figure, never a timed assertion); fail
    naming ``what`` when it is still false after ``timeout`` seconds."""
    start = time.monotonic()
    while True:
        got = condition()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"{what}: still not true after {timeout} s"
        await asyncio.sleep(POLL_S)


def eventually_here(condition: Callable[[], Any], timeout: float = 30.0, what: str = "the condition") -> float:
    """``eventually`` for a test without an event loop (the condition is set by a thread)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: still not true after {timeout} s"
        time.sleep(POLL_S)
    return time.monotonic() - start
