"""Placement: which engine answers a model that several of them have.

Backends with ``is_engine = True`` -- the local MLX engine and the remote
mlxgate services (``backends/remote``) -- run the same models the same way,
so which of them answers is a matter of load, not priority.  When a model
resolves (without an alias) to two or more engines, they form one tier that
keeps the place of the first of them (the factory puts every engine before
Ollama and the clouds, whose order never changes), ordered by:

1. serving first: a backend whose ``serving`` is False (a remote draining or
   unreachable, per its health watch) goes last, and is then skipped;
2. warm first: the model is loaded there (its ``list_running``, cached for
   ``RouterConfig.running_ttl`` seconds and refreshed in the background at
   the first event and at the end of each request it serves, and from every
   ``list_running`` call);
3. least loaded: fewest requests in flight from this router (``in_flight``,
   counted per backend from the call to the backend to its end);
4. the priority order.

Spill: when every serving warm engine already has ``RouterConfig.spill_at``
requests in flight (default 8; 0 turns it off), step 2 is dropped, so the
least loaded engine that has the model on disk takes the next request and
loads it: sustained concurrency grows onto more machines, which then stay
in the spread as warm ones.

So sequential requests stay on the warm service, and concurrent ones spread
over every warm service (and beyond, past the spill point).  The order is
computed after the last await of ``place`` and the first attempt counts
itself in flight before anything else runs, so requests arriving together
each see the ones before them.  With a single engine nothing is fetched and
the order is the priority order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

from backends import call_context
from backends.base import Backend, is_engine, is_serving
from backends.breaker import CircuitBreaker, Clock, State
from backends.routing.catalogue import Target
from backends.types import RunningModel
from mlxgate.config import RouterConfig
from mlxgate.names import untagged

log = logging.getLogger(__name__)

#: Placement's look at what an engine has loaded: longer counts as "unknown"
#: (cold), and background refreshes of one backend are at least this far apart.
RUNNING_TIMEOUT_S = 2.0
RUNNING_MIN_INTERVAL_S = 0.5


def _key(name: str) -> str:
    """How placement compares a target's model with what is loaded."""
    return untagged(name).lower()


@dataclass
class _Running:
    """What an engine had loaded (``_key`` names), for placement."""

    expires_at: float  # router clock
    fetched: float  # time.monotonic(), spaces the background refreshes
    names: Optional[set[str]]  # None: could not be asked (counts as cold)


class Placement:
    """Orders a model's engines by warmth and load; counts requests in flight."""

    def __init__(
        self,
        backends: Sequence[Backend],
        config: RouterConfig,
        *,
        clock: Clock,
        breakers: Mapping[str, CircuitBreaker],
    ) -> None:
        self._rank = {b.name: i for i, b in enumerate(backends)}
        self._spill_at = config.spill_at
        self._running_ttl = config.running_ttl
        self._clock = clock
        self._breakers = breakers
        #: Requests this router has running at each backend (placement's load).
        self.in_flight: dict[str, int] = {b.name: 0 for b in backends}
        self.engines = [b for b in backends if is_engine(b)]
        self._running: dict[str, _Running] = {}
        self._running_locks = {b.name: asyncio.Lock() for b in self.engines}
        self._refreshers: dict[str, asyncio.Task] = {}
        self._refresh_again: set[str] = set()

    async def place(self, targets: list[Target]) -> list[Target]:
        """The engines among ``targets`` in placement order (module docstring),
        in the slots they held; other targets keep theirs."""
        slots = [i for i, t in enumerate(targets) if is_engine(t.backend)]
        if len(slots) < 2:
            return targets
        engines = [targets[i] for i in slots]
        await asyncio.gather(*(self._running_of(t.backend) for t in engines if is_serving(t.backend)))
        # No await from here until the caller's first attempt counts itself in flight.
        warm = [t for t in engines if is_serving(t.backend) and self.is_warm(t.backend.name, t.model)]
        spill = self._spill_at > 0 and bool(warm) and all(
            self.in_flight[t.backend.name] >= self._spill_at for t in warm)

        def order(t: Target) -> tuple[bool, bool, int, int]:
            name = t.backend.name
            cold = not spill and not self.is_warm(name, t.model)
            return (not is_serving(t.backend), cold, self.in_flight[name], self._rank[name])

        out = list(targets)
        for i, t in zip(slots, sorted(engines, key=order)):
            out[i] = t
        return out

    def is_warm(self, backend: str, model: str) -> bool:
        """Placement's view: does ``backend`` have ``model`` loaded?"""
        running = self._running.get(backend)
        return running is not None and running.names is not None and _key(model) in running.names

    @contextlib.contextmanager
    def counted(self, backend: Backend) -> Iterator[None]:
        """One request in flight at ``backend`` (placement's load)."""
        self.in_flight[backend.name] += 1
        try:
            yield
        finally:
            self.in_flight[backend.name] -= 1
            self.refresh_soon(backend)

    def saw_running(self, backend: Backend, running: list[RunningModel]) -> None:
        """What ``backend`` answered to a ``list_running`` someone else asked."""
        if backend in self.engines:
            self._note_running(backend.name, {_key(r.name) for r in running})

    def refresh_soon(self, backend: Backend) -> None:
        """Refresh what an engine has loaded in the background (after it
        served something); one refresh per backend at a time, coalesced."""
        if len(self.engines) < 2 or not is_engine(backend):
            return
        name = backend.name
        task = self._refreshers.get(name)
        if task is not None and not task.done():
            self._refresh_again.add(name)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a generator finalized outside the loop: nothing to refresh for
            return
        self._refreshers[name] = loop.create_task(
            self._refresher(backend), name=f"router: {name} running models"
        )

    def engine_orders(self) -> list[list[str]]:
        """The engines backwards, when there are several: placement may put a
        later one first, so fallbacks run that way too."""
        return [[b.name for b in reversed(self.engines)]] if len(self.engines) > 1 else []

    async def close(self) -> None:
        for task in self._refreshers.values():
            task.cancel()
        await asyncio.gather(*self._refreshers.values(), return_exceptions=True)
        self._refreshers.clear()

    async def _running_of(self, backend: Backend) -> None:
        """Make sure what ``backend`` has loaded is known (cached for running_ttl)."""
        cached = self._running.get(backend.name)
        if cached is not None and cached.expires_at > self._clock():
            return
        if self._breakers[backend.name].state is State.OPEN:
            return
        async with self._running_locks[backend.name]:
            cached = self._running.get(backend.name)
            if cached is not None and cached.expires_at > self._clock():
                return
            await self._fetch_running(backend)

    async def _fetch_running(self, backend: Backend) -> None:
        names: Optional[set[str]]
        try:
            with call_context.detached():
                running = await asyncio.wait_for(backend.list_running(), RUNNING_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # placement only: health is the breaker's and the watch's business
            log.debug("%s: list_running for placement failed: %s", backend.name, getattr(e, "message", repr(e)))
            names = None
        else:
            names = {_key(r.name) for r in running}
        self._note_running(backend.name, names)

    def _note_running(self, backend: str, names: Optional[set[str]]) -> None:
        self._running[backend] = _Running(self._clock() + self._running_ttl, time.monotonic(), names)

    async def _refresher(self, backend: Backend) -> None:
        name = backend.name
        while True:
            self._refresh_again.discard(name)
            last = self._running.get(name)
            if last is not None:
                wait = last.fetched + RUNNING_MIN_INTERVAL_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            if is_serving(backend):
                async with self._running_locks[name]:
                    await self._fetch_running(backend)
            if name not in self._refresh_again:
                return
