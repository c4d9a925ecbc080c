"""Client disconnects cancel the generation end to end (HTTP -> gRPC -> MLX engine).

Each test starts a long generation (2,000 tokens: seconds of work on the
test model), checks the engine holds a sequence, drops the HTTP connection
and expects the engine's ``active_count`` back at 0 within about a second,
long before the generation could have finished on its own.
"""

from __future__ import annotations

import asyncio

import aiohttp
from tests.polling import eventually

LONG = 2000


async def _wait_active(backend, want, timeout: float) -> float:
    return await eventually(lambda: backend.active_count == want, timeout, f"active_count == {want}")


async def test_ndjson_disconnect_cancels_generation(stack):
    await _wait_active(stack.backend, 0, 5)
    body = {"model": stack.model, "prompt": "count to a million", "options": {"num_predict": LONG}}
    session = aiohttp.ClientSession()
    try:
        r = await session.post(stack.base + "/api/generate", json=body)
        assert r.status == 200
        await r.content.readline()
        await r.content.readline()
        assert stack.backend.active_count == 1
        r.close()  # drop the connection mid-stream
    finally:
        await session.close()
    took = await _wait_active(stack.backend, 0, 1.5)
    assert took < 1.5


async def test_sse_disconnect_cancels_every_choice(stack):
    await _wait_active(stack.backend, 0, 5)
    body = {"model": stack.model, "messages": [{"role": "user", "content": "go"}], "max_tokens": LONG,
            "n": 2, "stream": True}
    session = aiohttp.ClientSession()
    try:
        r = await session.post(stack.base + "/v1/chat/completions", json=body)
        assert r.status == 200
        for _ in range(4):
            await r.content.readline()
        assert stack.backend.active_count == 2
        r.close()
    finally:
        await session.close()
    await _wait_active(stack.backend, 0, 1.5)


async def test_non_streaming_disconnect_cancels_generation(stack):
    await _wait_active(stack.backend, 0, 5)
    body = {"model": stack.model, "prompt": "go", "stream": False, "options": {"num_predict": LONG}}

    async def call() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(stack.base + "/api/generate", json=body) as r:
                await r.read()

    task = asyncio.create_task(call())
    await _wait_active(stack.backend, 1, 5)
    task.cancel()  # the client gives up: its connection closes
    try:
        await task
    except asyncio.CancelledError:
        pass
    await _wait_active(stack.backend, 0, 1.5)
