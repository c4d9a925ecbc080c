"""One driver for every route that answers a server stream: a generation
(Ollama, OpenAI, Anthropic, Responses) or a model's pull or create progress.

``run`` starts the calls and waits for each one's first event, so a failure
before any token is an ordinary HTTP status in the caller's dialect.  Then it
either hands every event to the renderer for one JSON answer, or opens the
stream (the headers name the backend: fallback happens only before the
first event, so it is final) and writes the dialect's start, each event as
it arrives, and its tail.  A failure after the stream began is the stream's
last frame and the stream ends there (``streaming.pump``).  However it ends
(a client gone, an error, a cancelled handler), every call is cancelled.

A dialect says only how a generation looks on its wire: a ``Renderer``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Iterable, Optional

from aiohttp import web

from gateway.client import EventStream, never_ready
from gateway.errors import ApiError, Dialect, adapt, body_for
from gateway.events import check_done, is_done
from gateway.render import json_response
from gateway.state import backend_header, request_id
from gateway.streaming import SSE, Frames, Pinger, merge, open_stream, pump, sse_frame, with_first


class Renderer:
    """How one dialect's wire shows a generation: the answer's media type,
    a frame, an error frame, what goes before the first event (``start``),
    each event, what follows the last one (``tail``, then ``closing``), and
    the whole answer of a request that does not stream (``take`` each event,
    then ``whole``).  Events come with their stream's index: an OpenAI
    request with ``n`` > 1 runs n streams."""

    media_type = SSE
    dialect: Dialect = "openai"
    #: Written after the tail when the stream ended cleanly (OpenAI's ``data: [DONE]``).
    closing = b""
    #: Written whenever the stream has been silent ``ping_interval`` seconds (Anthropic's pings).
    ping = b""
    ping_interval = 0.0

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
        """A failure after the stream began, as its last frame: the dialect's error body."""
        return self.frame(body_for(adapt(err, self.dialect), self.dialect))

    def start(self) -> Iterable[Any]:
        return ()

    def event(self, index: int, ev: Any) -> Iterable[Any]:
        raise NotImplementedError

    async def tail(self) -> Iterable[Any]:
        """After the last event; raises ``ApiError`` when the events did not
        make a whole answer (that error is then the last frame)."""
        return ()

    def take(self, index: int, ev: Any) -> None:
        """Each event of a request that does not stream, for ``whole``."""
        raise NotImplementedError

    async def whole(self) -> Any:
        """The answer of a request that does not stream, once every event was taken."""
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


async def _whole(firsts: list[Any], streams: list[EventStream], renderer: Renderer) -> web.Response:
    last = list(firsts)

    async def take(i: int) -> None:
        async for ev in with_first(firsts[i], streams[i]):
            renderer.take(i, ev)
            last[i] = ev

    if len(streams) == 1:
        await take(0)
    else:
        await asyncio.gather(*(take(i) for i in range(len(streams))))
    body = await renderer.whole()
    return json_response(body, headers=renderer.headers(last[0]) or None)


async def run(request: web.Request, streams: list[EventStream], renderer: Renderer, stream: bool) -> web.StreamResponse:
    """Answer the started calls ``streams`` with ``renderer``: one JSON
    answer, or (``stream``) the dialect's stream."""
    rid = request_id(request)
    try:
        firsts = await _start_all(streams)
        for f in firsts:
            renderer.check(f)
        if not stream:
            return await _whole(firsts, streams, renderer)
        resp = await open_stream(request, renderer.media_type, renderer.headers(firsts[0]))
        out = Frames(resp)
        pinger: Optional[Pinger] = None
        frame = renderer.frame
        if renderer.ping:
            pinger = Pinger(resp, renderer.ping_interval, renderer.ping)
            frame = lambda obj: pinger.note(renderer.frame(obj))  # noqa: E731
        try:
            for obj in renderer.start():
                out.add(frame(obj))
            # One stream: frames are held while its next event is already here.
            ready = streams[0].ready if len(streams) == 1 else never_ready
            events = _indexed(firsts[0], streams[0]) if len(streams) == 1 else merge(list(zip(firsts, streams)))
            async with contextlib.aclosing(events) as items:
                ok = await pump(out, items, lambda item: renderer.event(*item), frame, renderer.error_frame, rid,
                                ready)
        finally:
            if pinger is not None:
                await pinger.stop()
        if ok:
            with contextlib.suppress(ConnectionResetError):
                try:
                    tail = await renderer.tail()
                except ApiError as e:
                    out.add(renderer.error_frame(e))
                    await out.flush()
                    return resp
                for obj in tail:
                    out.add(renderer.frame(obj))
                if renderer.closing:
                    out.add(renderer.closing)
                await out.close()
        return resp
    finally:
        for s in streams:
            s.cancel()
