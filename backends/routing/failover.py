"""Failover: which of a request's targets are called, and when the router
gives up on one and moves to the next.

Fallback.  Targets are tried in order.  A retryable ``BackendError``
(Unavailable, ResourceExhausted, DeadlineExceeded, ModelNotFound,
Unimplemented) raised *before the first event* moves on to the next target;
once an event has reached the caller, any failure is re-raised (the stream
ends with an error, never a splice of two answers).  Non-retryable errors
(InvalidArgument, Unauthenticated, PermissionDenied, ...) propagate at once.
At most ``RouterConfig.retry_budget`` targets are called per request.

Circuit breakers.  Each backend has a ``CircuitBreaker``; an open one is
skipped without a call.  Health failures are Unavailable and
DeadlineExceeded (connection errors arrive as Unavailable); any answer from
the backend, errors such as ModelNotFound included, counts as success.

Health.  A backend whose ``serving`` attribute is False gets no new request:
it is skipped like an open circuit (reason NOT_SERVING).

Budgets.  With a ``BudgetGuard`` (``backends.spend.Spend``), a target whose
backend it blocks (a cloud backend while a cloud budget of the call's key,
or the global one, is spent) is skipped without a call, reason BUDGET; its
error (RESOURCE_EXHAUSTED naming the budget and its reset) is the answer
when no other target answers.

Each move to a next backend is reported to ``on_fallback(from_backend,
to_backend, reason)``, ``reason`` one of ``REASONS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import (
    AsyncIterator,
    Awaitable,
    Callable,
    ContextManager,
    Iterator,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    TypeVar,
)

from backends.base import Backend, is_serving
from backends.breaker import CircuitBreaker, is_health_failure
from backends.errors import BackendError, ModelNotFound, Unavailable
from backends.routing.catalogue import Target
from mlxgate.limits import clip_name

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E")

#: Every ``reason`` a fallback can have: the gRPC code name of the error that
#: made the router move on, or why the backend was skipped without a call.
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


class BudgetGuard(Protocol):
    def blocked(self, backend: str) -> Optional[BackendError]:
        """Why ``backend`` may not be called for the current call (a spent budget), or None."""
        ...


def reason_of(e: BaseException) -> str:
    if isinstance(e, BackendError) and e.code.name in REASONS:
        return e.code.name
    return "INTERNAL"


class Skipped(Unavailable):
    """A target skipped without a call (never raised by a backend)."""


class _CircuitOpen(Skipped):
    """Skipped because its breaker is open."""


class _NotServing(Skipped):
    """Skipped because its health says it takes no new requests."""


def not_serving_message(backend: Backend) -> str:
    health = getattr(getattr(backend, "health", None), "value", "")
    if health == "unreachable":
        return f"{backend.name}: cannot be reached (health watch)"
    reason = getattr(backend, "not_serving_reason", None)
    if reason:
        return f"{backend.name}: not serving ({reason})"
    return f"{backend.name}: not serving (draining: its health is NOT_SERVING)"


class Attempts:
    """The targets one request actually calls, in order: at most the retry
    budget of them, skipping backends that are not serving, over budget or
    whose circuit is open, and reporting each move to a next backend as a
    fallback (from the last miss).

    Iterate for (target, breaker); call ``failed`` when a target's failure
    lets the request go on.  ``errors`` collects every miss for the final error.
    """

    def __init__(self, failover: Failover, targets: Sequence[Target]) -> None:
        self._failover = failover
        self._targets = targets
        self.errors: list[BackendError] = []
        self._pending: Optional[tuple[str, str]] = None  # (from backend, reason) of the last miss

    def __iter__(self) -> Iterator[tuple[Target, CircuitBreaker]]:
        f = self._failover
        budget = max(1, f.retry_budget)
        tried = 0
        for target in self._targets:
            if tried >= budget:
                return
            name = target.backend.name
            if not is_serving(target.backend):
                log.debug("%s skipped: not serving", name)
                self.failed(name, _NotServing(not_serving_message(target.backend)), NOT_SERVING)
                continue
            spent = f.budgets.blocked(name) if f.budgets is not None else None
            if spent is not None:
                log.debug("%s skipped: %s", name, spent.message)
                self.failed(name, spent, BUDGET)
                continue
            breaker = f.breakers[name]
            if not breaker.allow():
                log.debug("%s skipped: circuit open", name)
                self.failed(name, _CircuitOpen(f"{name}: circuit open after repeated failures"), CIRCUIT_OPEN)
                continue
            tried += 1
            if self._pending is not None:
                f.on_fallback(self._pending[0], name, self._pending[1])
            yield target, breaker

    def failed(self, backend: str, error: BackendError, reason: str) -> None:
        self.errors.append(error)
        self._pending = (backend, reason)


class Failover:
    """Runs one request over its targets (``first`` for a unary call,
    ``stream`` for generation), keeping each backend's breaker."""

    def __init__(
        self,
        breakers: Mapping[str, CircuitBreaker],
        retry_budget: int,
        *,
        budgets: Optional[BudgetGuard],
        on_fallback: Callable[[str, str, str], None],
        counted: Callable[[Backend], ContextManager[None]],
        not_found: Callable[[str], Awaitable[BackendError]],
    ) -> None:
        """``counted``: wraps each call to a backend (placement's in-flight
        count); ``not_found``: the error for a name no target has (the catalogue's)."""
        self.breakers = breakers
        self.retry_budget = retry_budget
        self.budgets = budgets
        self.on_fallback = on_fallback
        self._counted = counted
        self._not_found = not_found

    async def first(
        self, public: str, what: str, call: Callable[[Backend, str], Awaitable[T]], targets: Sequence[Target]
    ) -> tuple[Target, T]:
        """Run ``call(backend, name at backend)`` on ``targets`` in order; the
        first success wins."""
        attempts = Attempts(self, targets)
        for target, breaker in attempts:
            backend = target.backend
            try:
                with self._counted(backend):
                    result = await call(backend, target.model)
            except asyncio.CancelledError:
                breaker.release()
                raise
            except BackendError as e:
                breaker.record_failure() if is_health_failure(e) else breaker.record_success()
                if not e.retryable:
                    raise
                log.info("%s: %s failed for %s: %s", backend.name, what, public, e.message)
                attempts.failed(backend.name, e, reason_of(e))
                continue
            except Exception:
                breaker.record_failure()
                log.exception("%s: %s failed for %s", backend.name, what, public)
                attempts.failed(backend.name, Unavailable(f"{backend.name}: internal error"), "INTERNAL")
                continue
            breaker.record_success()
            return target, result
        raise await self.exhausted(public, attempts.errors)

    async def stream(
        self, public: str, targets: Sequence[Target], start: Callable[[Backend, str], AsyncIterator[E]]
    ) -> AsyncIterator[tuple[Target, E]]:
        """The events of the first target whose ``start(backend, name at
        backend)`` yields one, each with that target.  Failing before the
        first event moves on; after it, the failure is the caller's."""
        attempts = Attempts(self, targets)
        for target, breaker in attempts:
            backend = target.backend
            emitted = False
            verdict = False
            try:
                with self._counted(backend):
                    async with contextlib.aclosing(start(backend, target.model)) as events:
                        async for event in events:
                            if not emitted:
                                emitted = True
                                breaker.record_success()
                                verdict = True
                            yield target, event
                if not emitted:  # a backend that yields nothing is broken
                    raise Unavailable(f"{backend.name}: ended without an answer")
                return
            except BackendError as e:
                if not verdict or (emitted and is_health_failure(e)):
                    # (a backend that keeps dying mid-stream trips its breaker too)
                    verdict = True
                    breaker.record_failure() if is_health_failure(e) else breaker.record_success()
                if emitted or not e.retryable:
                    raise
                log.info("%s failed before the first token for %s: %s", backend.name, public, e.message)
                attempts.failed(backend.name, e, reason_of(e))
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception:
                if not verdict:
                    verdict = True
                    breaker.record_failure()
                if emitted:
                    raise
                log.exception("%s failed before the first token for %s", backend.name, public)
                attempts.failed(backend.name, Unavailable(f"{backend.name}: internal error"), "INTERNAL")
            finally:
                if not verdict:
                    breaker.release()
        raise await self.exhausted(public, attempts.errors)

    async def exhausted(self, public: str, errors: list[BackendError]) -> BackendError:
        """The error for a request no target could answer."""
        if errors and all(isinstance(e, ModelNotFound) for e in errors):
            return await self._not_found(public)
        real = [e for e in errors if not isinstance(e, ModelNotFound)]
        # The most telling failure: the last one a backend actually raised
        # (a "circuit open" or "not serving" note only when nothing else happened).
        for e in reversed(real):
            if not isinstance(e, Skipped):
                return e
        if real:
            return Unavailable(f"model '{clip_name(public)}': every backend is unavailable ("
                               + "; ".join(e.message for e in real) + ")")
        return await self._not_found(public)

    def breaker_states(self) -> dict[str, str]:
        return {name: br.state.value for name, br in self.breakers.items()}
