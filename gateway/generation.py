"""One driver for every route that answers a server stream: a generation
(Ollama, OpenAI, Anthropic, Responses) or a model pull's progress.

``run`` starts the calls and waits for each one's first event, so a failure
before any token is an ordinary HTTP status in the caller's dialect.  Then it
either collects every event into one JSON answer, or opens the stream (the
headers name the backend: fallback happens only before the first event, so
it is final) and writes the dialect's start, each event as it arrives, and
its tail.  A failure after the stream began is the stream's last frame and
the stream ends there (``streaming.pump``).  However it ends (a client gone,
an error, a cancelled handler), every call is cancelled.

A dialect says only how a generation looks on its wire: a ``Renderer``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncContextManager, AsyncIterator, Iterable

from aiohttp import web

from gateway.client import EventStream
from gateway.errors import ApiError
from gateway.events import check_done, is_done
from gateway.render import json_response
from gateway.state import backend_header, request_id
from gateway.streaming import SSE, merge, open_stream, pump, sse_frame, with_first


class Renderer:
    """How one dialect's wire shows a generation: the answer's media type,
    a frame, an error frame, what goes before the first event (``start``),
    each event, what follows the last one (``tail``, then ``closing``) and
    the whole answer of a request that does not stream.  Events come as
    (stream index, event): an OpenAI request with ``n`` > 1 runs n streams."""

    media_type = SSE
    #: Written after the tail when the stream ended cleanly (OpenAI's ``data: [DONE]``).
    closing = b""

    def check(self, first: Any) -> None:
        """A first event that reports a failure raises (a plain HTTP error)."""
        if is_done(first):
            check_done(first.done)

    def headers(self, ev: Any) -> dict[str, str]:
        """The answer's headers, from an event that names the backend: a
        stream's first one (the router names it there), a whole answer's Done."""
        return backend_header(ev)

    def frame(self, obj: Any) -> bytes:
        return sse_frame(obj)

    def error_frame(self, err: ApiError) -> bytes:
        raise NotImplementedError

    def writing(self, resp: web.StreamResponse) -> AsyncContextManager[Any]:
        """Held while the start and the events are written (Anthropic's pings)."""
        return contextlib.nullcontext()

    def start(self) -> Iterable[Any]:
        return ()

    def event(self, index: int, ev: Any) -> Iterable[Any]:
        raise NotImplementedError

    async def tail(self) -> Iterable[Any]:
        """After the last event; raises ``ApiError`` when the events did not
        make a whole answer (that error is then the last frame)."""
        return ()

    async def collect(self, stream: EventStream) -> list[Any]:
        """A stream's events, for ``whole``."""
        return await stream.collect()

    async def whole(self, results: list[list[Any]]) -> Any:
        """The answer of a request that does not stream: every stream's events."""
        raise NotImplementedError


async def _start_all(streams: list[EventStream]) -> list[Any]:
    """First event of every stream; the first failure is raised (after all settled)."""
    if len(streams) == 1:
        return [await streams[0].start()]
    firsts = await asyncio.gather(*(s.start() for s in streams), return_exceptions=True)
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None:
        # Drop the list before raising: it would hold the exception, whose
        # traceback holds this frame (a cycle keeping the request's buffers).
        del firsts
        raise failed
    return firsts


async def _indexed(first: Any, stream: EventStream) -> AsyncIterator[tuple[int, Any]]:
    async for ev in with_first(first, stream):
        yield 0, ev


async def run(request: web.Request, streams: list[EventStream], renderer: Renderer, stream: bool) -> web.StreamResponse:
    """Answer the started calls ``streams`` with ``renderer``: one JSON
    answer, or (``stream``) the dialect's stream."""
    rid = request_id(request)
    try:
        firsts = await _start_all(streams)
        for f in firsts:
            renderer.check(f)
        if not stream:
            results = [await renderer.collect(streams[0])] if len(streams) == 1 else \
                await asyncio.gather(*(renderer.collect(s) for s in streams))
            body = await renderer.whole(results)
            return json_response(body, headers=renderer.headers((results[0] or firsts[:1])[-1]) or None)

        resp = await open_stream(request, renderer.media_type, renderer.headers(firsts[0]))
        async with renderer.writing(resp):
            try:
                for obj in renderer.start():
                    await resp.write(renderer.frame(obj))
            except ConnectionResetError:
                return resp
            events = _indexed(firsts[0], streams[0]) if len(streams) == 1 else merge(list(zip(firsts, streams)))
            async with contextlib.aclosing(events) as items:
                ok = await pump(resp, items, lambda item: renderer.event(*item), renderer.frame,
                                renderer.error_frame, rid)
        if ok:
            with contextlib.suppress(ConnectionResetError):
                try:
                    tail = await renderer.tail()
                except ApiError as e:
                    await resp.write(renderer.error_frame(e))
                    return resp
                for obj in tail:
                    await resp.write(renderer.frame(obj))
                if renderer.closing:
                    await resp.write(renderer.closing)
                await resp.write_eof()
        return resp
    finally:
        for s in streams:
            s.cancel()
