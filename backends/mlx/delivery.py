"""Getting the engine's events to the requests' tasks cheaply.

The MLX thread produces, per decode step, one token for every sequence in
the batch.  Handing each one over with its own ``loop.call_soon_threadsafe``
costs a wake-up of the event loop (a write to its self-pipe) and a callback
per token.  Instead:

- each request has an :class:`EventQueue`, a deque the MLX thread appends to
  without waking anyone;
- the engine collects the queues it touched during one turn of its loop and
  hands them to a :class:`Dispatcher`, which wakes each event loop once for
  all of them (one ``call_soon_threadsafe`` per loop per turn);
- the request's task takes everything that is ready at once and
  :func:`coalesce` merges consecutive chunks into one, so a reader that fell
  behind (a slow client, a busy loop) catches up with one message instead of
  one per token.  Every token id and logprob is kept, in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Iterable, Optional

from backends.types import Chunk


class EventQueue:
    """One request's events: written by the MLX thread, read by the request's task.

    ``put`` may be called from any thread and wakes nobody; ``wake`` runs on
    the queue's event loop (the :class:`Dispatcher` schedules it there).
    ``deque.append``/``popleft`` are atomic, so no lock is needed.
    """

    __slots__ = ("loop", "_items", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque = deque()
        self._waiter: Optional[asyncio.Future] = None

    def put(self, event: Any) -> None:
        self._items.append(event)

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get_all(self) -> list:
        """Everything ready, in order (waits until there is something)."""
        while not self._items:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = []
        pop = self._items.popleft
        while self._items:
            items.append(pop())
        return items


def _wake_all(queues: Iterable[EventQueue]) -> None:
    for q in queues:
        q.wake()


class Dispatcher:
    """Wakes the readers of the queues touched since the last ``flush`` (MLX thread only).

    An owner is what a queue belongs to (the engine's ``Sequence``): anything
    with an ``events`` queue and a ``cancelled`` flag, set when the queue's
    event loop is gone so the engine stops working for nobody.
    """

    def __init__(self) -> None:
        self._touched: dict[int, Any] = {}

    def put(self, owner: Any, event: Any) -> None:
        owner.events.put(event)
        self._touched[id(owner)] = owner

    def flush(self) -> None:
        if not self._touched:
            return
        touched, self._touched = self._touched, {}
        by_loop: dict[int, list] = {}
        for owner in touched.values():
            by_loop.setdefault(id(owner.events.loop), []).append(owner)
        for owners in by_loop.values():
            try:
                owners[0].events.loop.call_soon_threadsafe(_wake_all, [o.events for o in owners])
            except RuntimeError:  # that loop is closed: nobody will read these
                for o in owners:
                    o.cancelled = True


def _mergeable(into: Chunk, nxt: Chunk) -> bool:
    """Whether ``nxt`` can join ``into`` without changing what comes first:
    nothing follows a tool call, and thinking never follows answer text."""
    if into.tool_calls:
        return False
    if nxt.thinking and into.text:
        return False
    return not (into.backend or into.model or nxt.backend or nxt.model)


def coalesce(events: list) -> list:
    """Merge runs of consecutive chunks (text, thinking, token ids, logprobs
    and tool calls concatenated in order); other events stay where they are.

    The chunks are the engine's own (one per emission, never shared), so the
    first of a run is extended in place.
    """
    if len(events) < 2:
        return events
    out: list = []
    for ev in events:
        last = out[-1] if out else None
        if type(ev) is Chunk and type(last) is Chunk and _mergeable(last, ev):
            last.text += ev.text
            last.thinking += ev.thinking
            last.token_ids.extend(ev.token_ids)
            last.logprobs.extend(ev.logprobs)
            last.tool_calls.extend(ev.tool_calls)
        else:
            out.append(ev)
    return out
