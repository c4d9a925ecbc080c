"""The router: one Backend in front of MLX, an upstream Ollama and cloud APIs.

Resolution.  A public model name maps to an ordered list of targets
(backend, name at that backend):

* when ``aliases`` has the name, its entries in order -- "mlx:<name>",
  "remote:<name>:<model>", "ollama:<tag>", "cloud:<provider>:<model>" -- and
  nothing else (an alias is an explicit routing decision, kept in its order;
  entries naming a backend that is not configured are skipped);
* otherwise every backend whose ``list_models`` has the name, in the
  priority order the backends were given (MLX, remote services, Ollama,
  cloud providers), with the engines among them placed (below).
  Model lists are cached for ``RouterConfig.model_list_ttl`` seconds; a
  backend whose listing fails is skipped (and that failure is cached too).

"x" and "x:latest" name the same model everywhere.

Placement.  Backends with ``is_engine = True`` -- the local MLX engine and the
remote mlxgate services (``backends/remote``) -- run the same models the same
way, so which of them answers is a matter of load, not priority.  When a
model resolves (without an alias) to two or more engines, they form one tier
that keeps the place of the first of them (the factory puts every engine
before Ollama and the clouds, whose order never changes), ordered by:

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
computed after the last await of ``targets`` and the first attempt counts
itself in flight before anything else runs, so requests arriving together
each see the ones before them.  With a single engine nothing is fetched and
the order is the priority order.

Fallback.  ``generate`` tries targets in order.  A retryable ``BackendError``
(Unavailable, ResourceExhausted, DeadlineExceeded, ModelNotFound,
Unimplemented) raised *before the first event* moves on to the next target;
once an event has reached the caller, any failure is re-raised (the stream
ends with an error, never a splice of two answers).  Non-retryable errors
(InvalidArgument, Unauthenticated, PermissionDenied, ...) propagate at once.
At most ``RouterConfig.retry_budget`` targets are tried per request.
Embeddings given as token ids go only to targets whose backend takes them
(``takes_token_ids``: the MLX engine); the others are never tried.

One hop.  A call another mlxgate forwarded (``backends.call_context.forwarded``) is
served by backends that do not forward (``forwards`` False or absent): its
targets, model list and running list leave the remote services out.

Health.  A backend whose ``serving`` attribute is False (optional, True when
absent; remote services have it) gets no new request: it is skipped like an
open circuit (reason NOT_SERVING), its model list is neither fetched nor
dropped, and it is left out of ``list_running``.

Budgets.  With a ``budgets`` object (``backends.spend.Spend``), a target
whose backend it blocks (a cloud backend while a cloud budget of the call's
key, or the global one, is spent) is skipped without a call, reason BUDGET;
its error (RESOURCE_EXHAUSTED naming the budget and its reset) is the answer
when no other target answers.

Circuit breakers.  Each backend has a ``CircuitBreaker``; an open one is
skipped without a call.  Health failures are Unavailable and
DeadlineExceeded (connection errors arrive as Unavailable); any answer from
the backend, errors such as ModelNotFound included, counts as success.

Who answered.  ``Done.backend`` is always the name of the backend that
answered; ``Done.model`` is the model name *at that backend* (what the
backend reported, or the name the router sent it when it reported none),
e.g. "llama3.2:latest" at Ollama for a request of "llama3.2".  The caller
knows the public name it asked for; ``Done.model`` tells it what actually ran.

Observer.  An optional object with ``fallback(from_backend, to_backend,
reason)`` and ``answered(backend, model)``.  Labels are bounded: backend names
come from configuration, ``reason`` is one of ``REASONS`` (gRPC code names), and ``model`` is a
name at the backend that came from its model list or the alias table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Optional, Protocol, Sequence, TypeVar

from backends import call_context
from backends.base import Backend
from backends.breaker import CircuitBreaker, Clock, State
from backends.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    Unavailable,
    Unimplemented,
)
from backends.types import (
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    GenerateRequest,
    LoadResult,
    ModelInfo,
    ModelShow,
    RunningModel,
    TokenCount,
)
from backends.types import (
    DetokenizeRequest,
    DetokenizeResult,
    RerankRequest,
    RerankResult,
    TokenizeRequest,
    TokenizeResult,
)
from mlxgate.config import RouterConfig
from mlxgate.limits import MAX_NAMES_IN_ERROR, clip_name
from mlxgate.names import untagged

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Every ``reason`` the observer can see: the gRPC code name of the error that
#: made the router move on, or CIRCUIT_OPEN when the backend was skipped.
REASONS = (
    "UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "UNIMPLEMENTED",
    "INTERNAL",
    "CIRCUIT_OPEN",
    "NOT_SERVING",
    "BUDGET",
)
CIRCUIT_OPEN = "CIRCUIT_OPEN"
NOT_SERVING = "NOT_SERVING"
BUDGET = "BUDGET"


#: A model listing that takes longer than this counts as failed (DEADLINE_EXCEEDED):
#: a hung upstream must not hold every request's routing for its full timeout.
LIST_TIMEOUT_S = 10.0

#: Placement's look at what an engine has loaded: longer counts as "unknown"
#: (cold), and background refreshes of one backend are at least this far apart.
RUNNING_TIMEOUT_S = 2.0
RUNNING_MIN_INTERVAL_S = 0.5



def available(names: Sequence[str]) -> str:
    """A few of the names a caller could have meant; the whole list is /api/tags."""
    if not names:
        return "no models are available"
    shown = ", ".join(clip_name(n) for n in names[:MAX_NAMES_IN_ERROR])
    if len(names) > MAX_NAMES_IN_ERROR:
        shown += f", ... ({len(names) - MAX_NAMES_IN_ERROR} more: see /api/tags)"
    return f"available models: {shown}"


class BudgetGuard(Protocol):
    def blocked(self, backend: str) -> Optional[BackendError]:
        """Why ``backend`` may not be called for the current call (a spent budget), or None."""
        ...


class RouterObserver(Protocol):
    def fallback(self, from_backend: str, to_backend: str, reason: str) -> None: ...

    def answered(self, backend: str, model: str) -> None: ...


def _reason(e: BaseException) -> str:
    if isinstance(e, BackendError) and e.code.name in REASONS:
        return e.code.name
    return "INTERNAL"


class _Skipped(Unavailable):
    """A target skipped without a call (never raised by a backend)."""


class _CircuitOpen(_Skipped):
    """Skipped because its breaker is open."""


class _NotServing(_Skipped):
    """Skipped because its health says it takes no new requests."""


def _is_health_failure(e: BaseException) -> bool:
    return isinstance(e, (Unavailable, DeadlineExceeded))


def _serving(backend: Backend) -> bool:
    return getattr(backend, "serving", True)


def _is_engine(backend: Backend) -> bool:
    return getattr(backend, "is_engine", False)


def _not_serving_message(backend: Backend) -> str:
    health = getattr(getattr(backend, "health", None), "value", "")
    if health == "unreachable":
        return f"{backend.name}: cannot be reached (health watch)"
    reason = getattr(backend, "not_serving_reason", None)
    if reason:
        return f"{backend.name}: not serving ({reason})"
    return f"{backend.name}: not serving (draining: its health is NOT_SERVING)"


def _key(name: str) -> str:
    """How placement compares a target's model with what is loaded."""
    return untagged(name).lower()


@dataclass
class Target:
    backend: Backend
    model: str  # the name at that backend


@dataclass
class _Listing:
    expires_at: float
    models: Optional[list[ModelInfo]]  # None: the listing failed


@dataclass
class _Running:
    """What an engine had loaded (``_key`` names), for placement."""

    expires_at: float  # router clock
    fetched: float  # time.monotonic(), spaces the background refreshes
    names: Optional[set[str]]  # None: could not be asked (counts as cold)


class _Attempts:
    """The targets one request actually calls, in order: at most the retry
    budget of them, skipping backends whose circuit is open, and reporting
    each move to a next backend as a fallback (from the last miss).

    Iterate for (target, breaker); call ``failed`` when a target's failure
    lets the request go on.  ``errors`` collects every miss for the final error.
    """

    def __init__(self, router: Router, targets: Sequence[Target]) -> None:
        self._router = router
        self._targets = targets
        self.errors: list[BackendError] = []
        self._pending: Optional[tuple[str, str]] = None  # (from backend, reason) of the last miss

    def __iter__(self) -> Iterator[tuple[Target, CircuitBreaker]]:
        budget = max(1, self._router.rc.retry_budget)
        tried = 0
        for target in self._targets:
            if tried >= budget:
                return
            name = target.backend.name
            if not _serving(target.backend):
                log.debug("%s skipped: not serving", name)
                self.failed(name, _NotServing(_not_serving_message(target.backend)), NOT_SERVING)
                continue
            budgets = self._router.budgets
            spent = budgets.blocked(name) if budgets is not None else None
            if spent is not None:
                log.debug("%s skipped: %s", name, spent.message)
                self.failed(name, spent, BUDGET)
                continue
            breaker = self._router.breakers[name]
            if not breaker.allow():
                log.debug("%s skipped: circuit open", name)
                self.failed(name, _CircuitOpen(f"{name}: circuit open after repeated failures"), CIRCUIT_OPEN)
                continue
            tried += 1
            if self._pending is not None:
                self._router._fallback(self._pending[0], name, self._pending[1])
            yield target, breaker

    def failed(self, backend: str, error: BackendError, reason: str) -> None:
        self.errors.append(error)
        self._pending = (backend, reason)

class Router:
    """A Backend that routes each request over ``backends`` (priority order)."""

    name = "router"

    def __init__(
        self,
        backends: Sequence[Backend],
        config: Optional[RouterConfig] = None,
        aliases: Optional[Mapping[str, Sequence[str]]] = None,
        *,
        observer: Optional[RouterObserver] = None,
        clock: Clock = time.monotonic,
        budgets: Optional[BudgetGuard] = None,
    ) -> None:
        """``config``: the ``[router]`` section; ``aliases``: public name ->
        ordered targets ("mlx:<name>", "remote:<name>:<model>", "ollama:<tag>",
        "cloud:<provider>:<model>")."""
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique, got {names}")
        self.backends = list(backends)
        self.rc = config if config is not None else RouterConfig()
        self.aliases: dict[str, list[str]] = {k: list(v) for k, v in (aliases or {}).items()}
        self.observer = observer
        self.clock = clock
        self.budgets = budgets
        self._by_name = {b.name: b for b in self.backends}
        self.breakers = {
            b.name: CircuitBreaker(self.rc.breaker_failures, self.rc.breaker_cooldown, clock) for b in self.backends
        }
        self._listings: dict[str, _Listing] = {}
        self._list_locks = {b.name: asyncio.Lock() for b in self.backends}
        self._warned_aliases: set[str] = set()
        #: Requests this router has running at each backend (placement's load).
        self.in_flight: dict[str, int] = {b.name: 0 for b in self.backends}
        self._engines = [b for b in self.backends if _is_engine(b)]
        self._running: dict[str, _Running] = {}
        self._running_locks = {b.name: asyncio.Lock() for b in self._engines}
        self._refreshers: dict[str, asyncio.Task] = {}
        self._refresh_again: set[str] = set()

    async def start(self) -> None:
        """Start what backends run in the background (remote services' health
        watches); otherwise each starts with its first call."""
        for b in self.backends:
            start = getattr(b, "start", None)
            if start is not None:
                await start()

    # ------------------------------------------------------------ observer

    def _fallback(self, src: str, dst: str, reason: str) -> None:
        log.info("fallback %s -> %s (%s)", src, dst, reason)
        if self.observer is not None:
            try:
                self.observer.fallback(src, dst, reason)
            except Exception:
                log.exception("router observer failed")

    def _answered(self, backend: str, model: str) -> None:
        if self.observer is not None:
            try:
                self.observer.answered(backend, model)
            except Exception:
                log.exception("router observer failed")

    # ------------------------------------------------------------ model lists

    async def _models_of(self, backend: Backend) -> Optional[list[ModelInfo]]:
        """The backend's model list (cached), or None when it cannot be had now."""
        now = self.clock()
        cached = self._listings.get(backend.name)
        if cached is not None and cached.expires_at > now:
            return cached.models
        async with self._list_locks[backend.name]:
            cached = self._listings.get(backend.name)
            now = self.clock()
            if cached is not None and cached.expires_at > now:
                return cached.models
            if not _serving(backend):
                # Draining or unreachable: keep what it had (it is skipped
                # when routing), neither ask nor cache a failure.
                return cached.models if cached is not None else None
            breaker = self.breakers[backend.name]
            if not breaker.allow():
                # Open circuit: reuse a stale list if there is one, else skip.
                return cached.models if cached is not None else None
            models: Optional[list[ModelInfo]]
            try:
                try:
                    with call_context.detached():  # a shared cache: not this caller's deadline
                        models = await asyncio.wait_for(backend.list_models(), LIST_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"{backend.name}: listing models timed out") from None
            except asyncio.CancelledError:
                breaker.release()
                raise
            except BackendError as e:
                log.warning("%s: listing models failed: %s", backend.name, e.message)
                breaker.record_failure() if _is_health_failure(e) else breaker.release()
                models = None
            except Exception:
                log.exception("%s: listing models failed", backend.name)
                breaker.record_failure()
                models = None
            else:
                breaker.record_success()
            self._listings[backend.name] = _Listing(self.clock() + self.rc.model_list_ttl, models)
            return models

    def invalidate_model_lists(self) -> None:
        self._listings.clear()

    @staticmethod
    def _find(models: Optional[list[ModelInfo]], name: str) -> Optional[ModelInfo]:
        if not models:
            return None
        want = untagged(name)
        exact = [m for m in models if m.name == name]
        if exact:
            return exact[0]
        for m in models:
            if untagged(m.name) == want:
                return m
        return None

    def _alias_entries(self, public: str) -> Optional[list[str]]:
        aliases = self.aliases
        if public in aliases:
            return aliases[public]
        want = untagged(public)
        for k, v in aliases.items():
            if untagged(k) == want:
                return v
        return None

    def _parse_alias(self, entry: str) -> Optional[Target]:
        if entry.startswith("remote:"):
            # "remote:<name>:<model>": a name may hold ":" itself (host:port),
            # so the longest configured remote the entry starts with.
            names = [n for n in self._by_name if n.startswith("remote:") and entry.startswith(n + ":")]
            if not names:
                return self._bad_alias(entry, "no configured remote service matches")
            backend_name = max(names, key=len)
            model = entry[len(backend_name) + 1:]
            if not model:
                return self._bad_alias(entry)
            return Target(self._by_name[backend_name], model)
        if entry.startswith("cloud:"):
            parts = entry.split(":", 2)
            if len(parts) != 3 or not parts[2]:
                return self._bad_alias(entry)
            backend_name, model = f"cloud:{parts[1]}", parts[2]
        else:
            backend_name, sep, model = entry.partition(":")
            if not sep or not model:
                return self._bad_alias(entry)
        backend = self._by_name.get(backend_name)
        if backend is None:
            return self._bad_alias(entry, f"backend {backend_name} is not configured")
        return Target(backend, model)

    def _bad_alias(
        self,
        entry: str,
        why: str = "expected mlx:<name>, remote:<name>:<model>, ollama:<tag> or cloud:<provider>:<model>",
    ) -> None:
        if entry not in self._warned_aliases:
            self._warned_aliases.add(entry)
            log.warning("alias target %r skipped: %s", entry, why)
        return None

    def _usable(self) -> list[Backend]:
        """The backends this call may use: all, but those that forward to
        another mlxgate when the call was itself forwarded (one hop only)."""
        if call_context.forwarded():
            return [b for b in self.backends if not getattr(b, "forwards", False)]
        return self.backends

    async def targets(self, public: str) -> list[Target]:
        """Ordered (backend, name at backend) for a public name."""
        usable = self._usable()
        entries = self._alias_entries(public)
        if entries is not None:
            return [t for t in (self._parse_alias(e) for e in entries) if t is not None and t.backend in usable]
        listings = await asyncio.gather(*(self._models_of(b) for b in usable))
        out = []
        for backend, models in zip(usable, listings):
            found = self._find(models, public)
            if found is not None:
                out.append(Target(backend, found.name))
        return await self._place(out)

    # ------------------------------------------------------------ placement

    async def _place(self, targets: list[Target]) -> list[Target]:
        """The engines among ``targets`` in placement order (module docstring),
        in the slots they held; other targets keep theirs."""
        slots = [i for i, t in enumerate(targets) if _is_engine(t.backend)]
        if len(slots) < 2:
            return targets
        engines = [targets[i] for i in slots]
        await asyncio.gather(*(self._running_of(t.backend) for t in engines if _serving(t.backend)))
        # No await from here until the caller's first attempt counts itself in flight.
        rank = {b.name: i for i, b in enumerate(self.backends)}
        warm = [t for t in engines if _serving(t.backend) and self.is_warm(t.backend.name, t.model)]
        spill = self.rc.spill_at > 0 and bool(warm) and all(
            self.in_flight[t.backend.name] >= self.rc.spill_at for t in warm)

        def order(t: Target) -> tuple[bool, bool, int, int]:
            name = t.backend.name
            cold = not spill and not self.is_warm(name, t.model)
            return (not _serving(t.backend), cold, self.in_flight[name], rank[name])

        out = list(targets)
        for i, t in zip(slots, sorted(engines, key=order)):
            out[i] = t
        return out

    def is_warm(self, backend: str, model: str) -> bool:
        """Placement's view: does ``backend`` have ``model`` loaded?"""
        running = self._running.get(backend)
        return running is not None and running.names is not None and _key(model) in running.names

    async def _running_of(self, backend: Backend) -> None:
        """Make sure what ``backend`` has loaded is known (cached for running_ttl)."""
        cached = self._running.get(backend.name)
        if cached is not None and cached.expires_at > self.clock():
            return
        if self.breakers[backend.name].state is State.OPEN:
            return
        async with self._running_locks[backend.name]:
            cached = self._running.get(backend.name)
            if cached is not None and cached.expires_at > self.clock():
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
        self._running[backend] = _Running(self.clock() + self.rc.running_ttl, time.monotonic(), names)

    def _refresh_soon(self, backend: Backend) -> None:
        """Refresh what an engine has loaded in the background (after it
        served something); one refresh per backend at a time, coalesced."""
        if len(self._engines) < 2 or not _is_engine(backend):
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

    async def _refresher(self, backend: Backend) -> None:
        name = backend.name
        while True:
            self._refresh_again.discard(name)
            last = self._running.get(name)
            if last is not None:
                wait = last.fetched + RUNNING_MIN_INTERVAL_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            if _serving(backend):
                async with self._running_locks[name]:
                    await self._fetch_running(backend)
            if name not in self._refresh_again:
                return

    @contextlib.contextmanager
    def _counted(self, backend: Backend) -> Iterator[None]:
        """One request in flight at ``backend`` (placement's load)."""
        self.in_flight[backend.name] += 1
        try:
            yield
        finally:
            self.in_flight[backend.name] -= 1
            self._refresh_soon(backend)

    async def _not_found(self, public: str) -> ModelNotFound:
        names = [m.name for m in await self.list_models()]
        msg = f"model '{clip_name(public)}' not found; {available(names)}"
        usable = self._usable()
        unreachable = [b.name for b in usable if (lst := self._listings.get(b.name)) and lst.models is None]
        if unreachable:
            msg += f" (could not list: {', '.join(unreachable)})"
        resting = [b.name for b in usable if not _serving(b) and b.name not in self._listings]
        if resting:
            msg += f" (not serving, so not listed: {', '.join(resting)})"
        return ModelNotFound(msg)

    # ------------------------------------------------------------ generate

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        targets = await self.targets(req.model)
        if not targets:
            raise await self._not_found(req.model)
        attempts = _Attempts(self, targets)
        for target, breaker in attempts:
            backend = target.backend
            sub = dataclasses.replace(req, model=target.model)
            emitted = False
            verdict = False
            try:
                with self._counted(backend):
                    async with contextlib.aclosing(backend.generate(sub)) as events:
                        async for event in events:
                            if isinstance(event, Done) or not emitted:
                                # Done always says who answered; so does the first chunk.
                                event.backend = backend.name
                                event.model = event.model or target.model
                            if not emitted:
                                emitted = True
                                breaker.record_success()
                                verdict = True
                                self._answered(backend.name, target.model)
                                self._refresh_soon(backend)  # the model is loaded there now
                            yield event
                if not emitted:  # a backend that yields nothing is broken
                    raise Unavailable(f"{backend.name}: ended without an answer")
                return
            except BackendError as e:
                if not verdict or (emitted and _is_health_failure(e)):
                    # (a backend that keeps dying mid-stream trips its breaker too)
                    verdict = True
                    breaker.record_failure() if _is_health_failure(e) else breaker.record_success()
                if emitted or not e.retryable:
                    raise
                log.info("%s failed before the first token for %s: %s", backend.name, req.model, e.message)
                attempts.failed(backend.name, e, _reason(e))
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception:
                if not verdict:
                    verdict = True
                    breaker.record_failure()
                if emitted:
                    raise
                log.exception("%s failed before the first token for %s", backend.name, req.model)
                attempts.failed(backend.name, Unavailable(f"{backend.name}: internal error"), "INTERNAL")
            finally:
                if not verdict:
                    breaker.release()
        raise await self._exhausted(req.model, attempts.errors)

    async def _exhausted(self, public: str, errors: list[BackendError]) -> BackendError:
        """The error for a request no target could answer."""
        if errors and all(isinstance(e, ModelNotFound) for e in errors):
            return await self._not_found(public)
        real = [e for e in errors if not isinstance(e, ModelNotFound)]
        # The most telling failure: the last one a backend actually raised
        # (a "circuit open" or "not serving" note only when nothing else happened).
        for e in reversed(real):
            if not isinstance(e, _Skipped):
                return e
        if real:
            return Unavailable(f"model '{clip_name(public)}': every backend is unavailable ("
                               + "; ".join(e.message for e in real) + ")")
        return await self._not_found(public)

    # ------------------------------------------------------------ unary calls

    async def _first(
        self,
        public: str,
        what: str,
        call: Callable[[Backend, str], Awaitable[T]],
        targets: Optional[list[Target]] = None,
    ) -> tuple[Target, T]:
        """Run ``call`` on targets (default: all of ``public``'s) in order; the
        first success wins (same rules as generate)."""
        if targets is None:
            targets = await self.targets(public)
        if not targets:
            raise await self._not_found(public)
        attempts = _Attempts(self, targets)
        for target, breaker in attempts:
            backend = target.backend
            try:
                with self._counted(backend):
                    result = await call(backend, target.model)
            except asyncio.CancelledError:
                breaker.release()
                raise
            except BackendError as e:
                breaker.record_failure() if _is_health_failure(e) else breaker.record_success()
                if not e.retryable:
                    raise
                log.info("%s: %s failed for %s: %s", backend.name, what, public, e.message)
                attempts.failed(backend.name, e, _reason(e))
                continue
            except Exception:
                breaker.record_failure()
                log.exception("%s: %s failed for %s", backend.name, what, public)
                attempts.failed(backend.name, Unavailable(f"{backend.name}: internal error"), "INTERNAL")
                continue
            breaker.record_success()
            return target, result
        raise await self._exhausted(public, attempts.errors)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        targets = await self.targets(req.model)
        if req.input_tokens:
            targets = self._taking_token_ids(req.model, targets)
        target, result = await self._first(
            req.model, "embed", lambda b, name: b.embed(dataclasses.replace(req, model=name)), targets
        )
        result.backend = target.backend.name
        result.model = result.model or target.model
        self._answered(target.backend.name, target.model)
        return result

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        """Counted by the first target that can count (the MLX engine renders and
        tokenizes; an Anthropic provider asks its API); backends that cannot
        (an upstream Ollama, OpenAI-compatible clouds) answer Unimplemented and
        the next is asked, as for any retryable failure."""

        async def count(b: Backend, name: str) -> TokenCount:
            method = getattr(b, "count_tokens", None)
            if method is None:
                raise Unimplemented(f"{b.name}: counting tokens is not supported")
            return await method(dataclasses.replace(req, model=name))

        target, result = await self._first(req.model, "count_tokens", count)
        result.backend = target.backend.name
        result.model = result.model or target.model
        return result

    async def rerank(self, req: RerankRequest) -> RerankResult:
        """Reranked by the first target that can (the MLX engine, a remote
        service, a cloud provider serving ``/rerank``); the others answer
        Unimplemented and the next is asked."""

        async def call(b: Backend, name: str) -> RerankResult:
            method = getattr(b, "rerank", None)
            if method is None:
                raise Unimplemented(f"{b.name}: reranking is not supported")
            return await method(dataclasses.replace(req, model=name))

        target, result = await self._first(req.model, "rerank", call)
        result.backend = target.backend.name
        result.model = result.model or target.model
        self._answered(target.backend.name, target.model)
        return result

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        targets = self._tokenizing(req.model, await self.targets(req.model))
        target, result = await self._first(
            req.model, "tokenize", lambda b, name: b.tokenize(dataclasses.replace(req, model=name)), targets)
        result.backend = target.backend.name
        return result

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResult:
        targets = self._tokenizing(req.model, await self.targets(req.model))
        target, result = await self._first(
            req.model, "detokenize", lambda b, name: b.detokenize(dataclasses.replace(req, model=name)), targets)
        result.backend = target.backend.name
        return result

    @staticmethod
    def _tokenizing(public: str, targets: list[Target]) -> list[Target]:
        """The targets that hold the model's tokenizer: those that take token
        ids (``Backend.takes_token_ids``: the MLX engine, remote services).
        An upstream Ollama or a cloud API has no tokenize endpoint, and its
        model's tokenizer is not ours to guess, so a model only they serve is
        the caller's error."""
        able = [t for t in targets if getattr(t.backend, "takes_token_ids", False)]
        if targets and not able:
            names = ", ".join(dict.fromkeys(t.backend.name for t in targets))
            raise InvalidArgument(
                f"model '{clip_name(public)}' is served by {names}, which cannot tokenize: tokenize and "
                "detokenize work only for models this server runs itself (MLX) or another mlxgate service runs"
            )
        return able

    @staticmethod
    def _taking_token_ids(public: str, targets: list[Target]) -> list[Target]:
        """The targets that can embed token ids (``Backend.takes_token_ids``).

        Ids are a model's own tokenizer's: sent to another backend's model they
        would be other words, a wrong answer nobody could see.  So the others are
        not tried at all -- when the local engine fails, its own error is the
        answer -- and a model only they serve is the caller's error.
        """
        able = [t for t in targets if getattr(t.backend, "takes_token_ids", False)]
        if targets and not able:
            names = ", ".join(dict.fromkeys(t.backend.name for t in targets))
            raise InvalidArgument(
                f"model '{clip_name(public)}' is served by {names}, which cannot embed token ids: token ids "
                "are taken only for models this server runs itself (MLX); send the input as text"
            )
        return able

    async def show_model(self, name: str) -> ModelShow:
        target, show = await self._first(name, "show_model", lambda b, n: b.show_model(n))
        show.info.backend = target.backend.name
        others = [t.backend.name for t in await self.targets(name) if t.backend is not target.backend]
        show.info.fallbacks = others
        return show

    async def load_model(self, name: str, keep_alive: Optional[float]) -> LoadResult:
        target, res = await self._first(name, "load_model", lambda b, n: b.load_model(n, keep_alive))
        res.backend = target.backend.name
        return res

    async def unload_model(self, name: str) -> bool:
        """Unload from every target that has it loaded (a model may be resident at
        two backends); True when any had it.  Errors only when every target failed."""
        targets = await self.targets(name)
        if not targets:
            raise await self._not_found(name)
        was = False
        errors: list[BackendError] = []
        for target in targets:
            breaker = self.breakers[target.backend.name]
            if not _serving(target.backend) or not breaker.allow():
                continue
            try:
                was = await target.backend.unload_model(target.model) or was
            except asyncio.CancelledError:
                breaker.release()
                raise
            except BackendError as e:
                breaker.record_failure() if _is_health_failure(e) else breaker.record_success()
                errors.append(e)
                continue
            except Exception:
                breaker.record_failure()
                log.exception("%s: unload_model failed", target.backend.name)
                errors.append(Unavailable(f"{target.backend.name}: internal error"))
                continue
            breaker.record_success()
            self._refresh_soon(target.backend)
        if not was and errors and len(errors) == len(targets):
            raise await self._exhausted(name, errors)
        return was

    # ------------------------------------------------------------ listings

    async def list_models(self) -> list[ModelInfo]:
        """Union over reachable backends, first backend (priority order) owning
        each name, ``fallbacks`` naming the others; aliases as their own entries."""
        usable = self._usable()
        listings = await asyncio.gather(*(self._models_of(b) for b in usable))
        owners: dict[str, ModelInfo] = {}
        order: list[str] = []
        for backend, models in zip(usable, listings):
            for m in models or []:
                key = untagged(m.name)
                if key in owners:
                    if backend.name != owners[key].backend and backend.name not in owners[key].fallbacks:
                        owners[key].fallbacks.append(backend.name)
                    continue
                info = dataclasses.replace(m, backend=backend.name, fallbacks=[], details=m.details)
                owners[key] = info
                order.append(key)
        by_backend = {b.name: models for b, models in zip(usable, listings)}
        for alias, entries in self.aliases.items():
            targets = [t for t in (self._parse_alias(e) for e in entries) if t is not None]
            reachable = [t for t in targets if by_backend.get(t.backend.name) is not None]
            if not reachable:
                continue
            first = reachable[0]
            base = self._find(by_backend.get(first.backend.name), first.model)
            info = ModelInfo(name=alias, backend=first.backend.name)
            if base is not None:
                info = dataclasses.replace(base, name=alias, backend=first.backend.name)
            seen: list[str] = []
            for t in reachable[1:]:
                if t.backend.name != first.backend.name and t.backend.name not in seen:
                    seen.append(t.backend.name)
            info.fallbacks = seen
            key = untagged(alias)
            if key not in owners:
                order.append(key)
            owners[key] = info
        return [owners[k] for k in order]

    async def list_running(self) -> list[RunningModel]:
        async def one(b: Backend) -> list[RunningModel]:
            if not _serving(b) or not self.breakers[b.name].allow():
                return []
            breaker = self.breakers[b.name]
            try:
                running = await b.list_running()
            except asyncio.CancelledError:
                breaker.release()
                raise
            except Exception as e:
                log.warning("%s: list_running failed: %s", b.name, getattr(e, "message", type(e).__name__))
                if not isinstance(e, BackendError) or _is_health_failure(e):
                    breaker.record_failure()
                else:
                    breaker.release()
                return []
            breaker.record_success()
            for r in running:
                r.backend = r.backend or b.name
            if b in self._engines:
                self._note_running(b.name, {_key(r.name) for r in running})
            return running

        out: list[RunningModel] = []
        for part in await asyncio.gather(*(one(b) for b in self._usable())):
            out.extend(part)
        return out + self._running_aliases(out)

    def _running_aliases(self, running: list[RunningModel]) -> list[RunningModel]:
        """An alias is running when one of its targets is: it is listed (as a
        copy of the first running target, in the alias's order) so a client
        that shows what is loaded by the name it uses (Open WebUI) sees it.
        An alias whose name is already listed adds nothing."""
        listed = {untagged(r.name) for r in running}
        out = []
        for alias, entries in self.aliases.items():
            if untagged(alias) in listed:
                continue
            for target in (t for t in (self._parse_alias(e) for e in entries) if t is not None):
                hit = next((r for r in running if r.backend == target.backend.name
                            and untagged(r.name) == untagged(target.model)), None)
                if hit is not None:
                    out.append(dataclasses.replace(hit, name=alias))
                    listed.add(untagged(alias))
                    break
        return out

    async def close(self) -> None:
        for task in self._refreshers.values():
            task.cancel()
        await asyncio.gather(*self._refreshers.values(), return_exceptions=True)
        self._refreshers.clear()
        for b in self.backends:
            try:
                await b.close()
            except Exception:
                log.exception("%s: close failed", b.name)

    # ------------------------------------------------------------ introspection

    @property
    def mlx_backend(self) -> Optional[Backend]:
        """The local engine, when configured (the memory collector reads it)."""
        return self._by_name.get("mlx")

    def alias_backend_orders(self) -> list[list[str]]:
        """Each alias's backends in its order (the fallbacks it can cause)."""
        orders = []
        for entries in self.aliases.values():
            orders.append([t.backend.name for t in (self._parse_alias(e) for e in entries) if t is not None])
        return orders

    def fallback_orders(self) -> list[list[str]]:
        """Every order the router can move between backends in, besides the
        priority order (metrics zero these pairs): each alias's, and the
        engines' backwards (placement may put a later one first)."""
        orders = self.alias_backend_orders()
        if len(self._engines) > 1:
            orders.append([b.name for b in reversed(self._engines)])
        return orders

    def health(self) -> dict[str, bool]:
        """Serving or not, for the backends that watch their health (remotes, a
        distributed MLX engine)."""
        return {b.name: _serving(b) for b in self.backends
                if hasattr(b, "serving") and getattr(b, "watches_health", True)}

    def breaker_states(self) -> dict[str, str]:
        return {name: br.state.value for name, br in self.breakers.items()}

    def __repr__(self) -> str:
        return f"Router({[b.name for b in self.backends]})"

