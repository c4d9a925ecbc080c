"""Stream writers every dialect shares: NDJSON (Ollama), SSE (OpenAI), SSE
with named events (Anthropic, OpenAI's Responses), pings in the silences.

The generation driver (``gateway/generation.py``) first awaits the stream's
first event (``EventStream.start``) so a failure before any token is still an
ordinary HTTP error; only then does it open the response with
``open_stream`` and hand the events to ``pump``.

``pump`` renders each event into zero or more JSON objects, frames and writes
them.  Frames are written together when they are ready together (``Frames``):
the events a read of the service already holds go out in one write, so the
first token leaves with the headers and whatever came with it, at once, and
the tail with the end of the chunked body.  Each write is a send on the
socket and a wake-up of the client (an instant upstream's answer was seven
writes, now two or three).

When the gRPC stream fails after the response began, the error becomes
the stream's last frame (NDJSON ``{"error": "..."}``, SSE
``data: {"error": {...}}``) and the stream ends there: for SSE no ``[DONE]``
follows, so a client can tell a truncated stream from a finished one.  When
the client goes away, writing raises ``ConnectionResetError``; ``pump`` stops
and the handler's ``finally`` cancels the gRPC call (with the runner's
``handler_cancellation`` the handler is cancelled outright, same ``finally``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Callable, Iterable, Optional, TypeVar

import grpc
from aiohttp import web

from gateway.client import EventStream, never_ready
from gateway.errors import ApiError, from_grpc, internal_error
from gateway.render import json_bytes
from mlxgate.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"

T = TypeVar("T")


def ndjson_frame(obj: Any) -> bytes:
    return json_bytes(obj) + b"\n"


def sse_frame(obj: Any) -> bytes:
    return b"data: " + json_bytes(obj) + b"\n\n"


def event_frame(obj: dict[str, Any]) -> bytes:
    """A named SSE event: ``event: <type>`` and ``data: <json>`` (the event's name is the data's type)."""
    return b"event: " + obj["type"].encode() + b"\ndata: " + json_bytes(obj) + b"\n\n"


#: Frames held for one write at most this many bytes (aiohttp's own drain threshold).
FLUSH_BYTES = 64 * 1024


class _StreamResponse(web.StreamResponse):
    """A stream whose headers leave with its first write (aiohttp sends a
    ``web.Response``'s that way; a ``StreamResponse``'s at ``prepare``, a
    send of their own).  The driver writes at once after ``prepare``."""

    _send_headers_immediately = False


async def open_stream(
    request: web.Request, content_type: str, headers: Optional[dict[str, str]] = None
) -> web.StreamResponse:
    """The stream's response, prepared; its headers go with the first write."""
    h = {"Content-Type": content_type, "Cache-Control": "no-cache"}
    if content_type == SSE:
        h["X-Accel-Buffering"] = "no"
    h.update(headers or {})
    resp = _StreamResponse(status=200, headers=h)
    await resp.prepare(request)
    return resp


class Frames:
    """A stream's frames, held until ``flush`` writes them as one write (at
    most ``FLUSH_BYTES`` held), or ``close`` writes them with the end of the body."""

    __slots__ = ("_resp", "_held", "_size")

    def __init__(self, resp: web.StreamResponse) -> None:
        self._resp = resp
        self._held: list[bytes] = []
        self._size = 0

    def add(self, frame: bytes) -> None:
        self._held.append(frame)
        self._size += len(frame)

    @property
    def full(self) -> bool:
        return self._size >= FLUSH_BYTES

    def _take(self) -> bytes:
        data = b"".join(self._held)
        self._held.clear()
        self._size = 0
        return data

    async def flush(self) -> None:
        """Write what is held (an empty write still sends the headers)."""
        await self._resp.write(self._take())

    async def close(self) -> None:
        """Write what is held and end the body, in one write."""
        await self._resp.write_eof(self._take())


class Pinger:
    """Writes ``ping`` whenever ``interval`` seconds pass without a frame.

    ``note`` is told every other frame: no timer per token, one sleeping task
    per stream.  A ping is one write, as every frame is, so it never lands
    inside another frame."""

    def __init__(self, resp: web.StreamResponse, interval: float, ping: bytes) -> None:
        self._resp = resp
        self._interval = interval
        self._ping = ping
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._task = asyncio.create_task(self._run())

    def note(self, frame: bytes) -> bytes:
        self._last = self._loop.time()
        return frame

    async def _run(self) -> None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            while True:
                wait = self._last + self._interval - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                self._last = self._loop.time()
                await self._resp.write(self._ping)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def with_first(first: T, rest: AsyncIterator[T] | Any) -> AsyncIterator[T]:
    """The already-read first event, then the rest of the stream."""
    yield first
    async for ev in rest:
        yield ev


async def pump(
    out: Frames,
    items: AsyncIterator[T],
    render: Callable[[T], Iterable[Any]],
    frame: Callable[[Any], bytes],
    error_frame: Callable[[ApiError], bytes],
    request_id: str = "",
    ready: Callable[[], bool] = never_ready,
) -> bool:
    """Write every rendered item; True when the stream ended cleanly.

    The frames ``out`` holds are written when the next item is not ``ready``
    (would have to be waited for) or ``out`` is full; after a clean end the
    last ones are still held, for the caller's tail and the end of the body.

    Returns False when the client went away (nothing more can be written).

    ``render`` may raise ``ApiError`` (e.g. a Done that reports an error); a
    gRPC failure is mapped with the error table.  Either way the error is
    written as the last frame and False is returned.
    """
    try:
        async for it in items:
            for obj in render(it):
                out.add(frame(obj))
            if out.full or not ready():
                await out.flush()
        return True
    except grpc.aio.AioRpcError as e:
        err = from_grpc(e, request_id)
    except ApiError as e:
        err = e
    except ConnectionResetError:
        log.info("client disconnected mid-stream (request %s)", request_id)
        return False
    except Exception:
        log.exception("stream failed (request %s)", request_id)
        err = internal_error(request_id)
    log.info("stream ended with error %s (request %s): %s", err.status, request_id, err.message)
    try:
        out.add(error_frame(err))
        await out.flush()
    except ConnectionResetError:
        pass
    return False


async def merge(
    streams: list[tuple[pb.GenerateResponse, EventStream]],
) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
    """Interleave several started streams as (index, event), in arrival order.

    The first failure is raised to the consumer; closing the generator (or a
    failure) cancels every task and every RPC.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    _END = object()

    async def drain(i: int, first: pb.GenerateResponse, s: EventStream) -> None:
        try:
            await queue.put((i, first))
            async for ev in s:
                await queue.put((i, ev))
            await queue.put((i, _END))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(drain(i, f, s)) for i, (f, s) in enumerate(streams)]
    live = len(tasks)
    try:
        while live:
            i, ev = await queue.get()
            if ev is _END:
                live -= 1
            elif isinstance(ev, BaseException):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        for _, s in streams:
            s.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
