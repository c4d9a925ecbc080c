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


async def eventually(condition: Callable[[], Any], timeout: float = 30.0, what: str = "the condition") -> None:
    """Return once ``condition()`` (a plain or async function) is true; fail
    naming ``what`` when it is still false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        assert time.monotonic() < deadline, f"{what}: still not true after {timeout} s"
        await asyncio.sleep(POLL_S)
