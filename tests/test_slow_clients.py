"""Clients that connect and stall: what they hold is bounded in time.

A connection without a whole request (nothing sent, headers cut short, idle
after an answer) is closed after ``http_idle_timeout``; a body that stops
arriving is a 408 in the caller's dialect after ``http_body_timeout``.  A
real front on port 0 over a real gRPC service (a scripted backend), with
short timeouts; the clients are raw sockets, as a stalling one would be."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from backends.service import start_inference_service
from gateway.app import create_app, start_http
from mlxgate.config import ServerConfig
from tests.fakes.scripted_backend import ScriptedBackend
from tests.polling import eventually

pytestmark = pytest.mark.timeout(60)

IDLE, BODY = 1.0, 1.0


@pytest.fixture
def hold() -> asyncio.Event:
    """Streams wait on it after their first chunk."""
    gate = asyncio.Event()
    gate.set()
    return gate


@pytest.fixture
async def front(hold):
    service = await start_inference_service(ScriptedBackend("mlx", ["m"], hold=hold), port=0)
    cfg = ServerConfig(host="127.0.0.1", port=0, http_idle_timeout=IDLE, http_body_timeout=BODY)
    http = await start_http(create_app(cfg, service.target), cfg.host, 0)
    try:
        yield http
    finally:
        await http.stop()
        await service.stop(grace=0.5)


async def _open(http, first: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


async def _closed_after(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent before."""
    started = time.monotonic()
    got = await asyncio.wait_for(reader.read(), 20)
    return time.monotonic() - started, got


async def test_stalled_and_idle_connections_are_closed(front):
    stalls = [b"", b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"]
    opened = [await _open(front, first) for first in stalls for _ in range(50)]
    await eventually(lambda: len(front.runner.server.connections) == 100, what="100 connections accepted")
    for reader, writer in opened:
        took, got = await _closed_after(reader)
        assert got == b"" and took < IDLE + 5
        writer.close()
    assert front.runner.server.connections == []

    # A kept-alive connection serves requests while they come, and is closed once idle.
    reader, writer = await _open(front)
    for _ in range(3):
        writer.write(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 200")
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        await asyncio.sleep(IDLE / 2)
    took, got = await _closed_after(reader)
    assert got == b"" and took < IDLE + 5
    writer.close()


@pytest.mark.parametrize("path, status, error", [
    ("/api/chat", 408, lambda b: b["error"]),
    ("/v1/chat/completions", 408, lambda b: b["error"]["message"]),
    ("/v1/messages", 400, lambda b: b["type"] == "error" and b["error"]["type"] == "invalid_request_error"),
    ("/v1/responses", 408, lambda b: b["error"]["message"]),
])
async def test_a_body_that_stops_arriving_is_a_408_in_the_dialect(front, path, status, error):
    """(Anthropic's dialect says 400, its invalid_request_error, as it answers other client faults.)"""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n").encode()
    reader, writer = await _open(front, head + b'{"model": "m", ')
    started = time.monotonic()
    status_line = await asyncio.wait_for(reader.readline(), 20)
    took = time.monotonic() - started
    assert status_line.startswith(b"HTTP/1.1 %d" % status), status_line
    assert BODY - 0.1 < took < BODY + 5
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    body = json.loads(await reader.readexactly(int(headers["content-length"])))
    assert error(body) and "request body not received within 1 s" in json.dumps(body)
    writer.close()


async def test_a_stream_longer_than_the_idle_timeout_runs_to_its_end(front, hold):
    hold.clear()
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    reader, writer = await _open(front, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
    await asyncio.sleep(IDLE * 2.5)  # the answer has begun; the stream is held past the idle timeout
    hold.set()
    rest = await asyncio.wait_for(reader.read(), 10)
    lines = [json.loads(x) for x in rest.split(b"\r\n") if x.startswith(b"{")]
    assert lines[-1]["done"] is True and "".join(x["response"] for x in lines) == "from mlx"
    writer.close()
