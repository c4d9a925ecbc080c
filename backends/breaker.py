"""A per-backend circuit breaker with an injectable clock.

closed     every call goes through; ``failures`` consecutive health failures
           (Unavailable, DeadlineExceeded, connection errors) open it.
open       calls are refused at once, for ``cooldown`` seconds: a dead
           upstream costs one fast skip, not a timeout per request.
half-open  after the cool-down exactly one probe is let through; its
           success closes the breaker, its failure opens it for another
           cool-down.  Other calls are refused while the probe is out.

The router calls ``allow()`` before a call and exactly one of
``record_success()``, ``record_failure()`` or ``release()`` after it
(``release`` when the call ended without saying anything about health, e.g.
the caller went away).
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Callable

from backends.errors import DeadlineExceeded, Unavailable

Clock = Callable[[], float]


def is_health_failure(e: BaseException) -> bool:
    """What counts against a breaker: Unavailable and DeadlineExceeded
    (connection errors arrive as Unavailable).  Any other answer of the
    backend, errors such as ModelNotFound included, shows it is up."""
    return isinstance(e, (Unavailable, DeadlineExceeded))


class State(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failures: int = 3, cooldown: float = 30.0, clock: Clock = time.monotonic) -> None:
        if failures < 1:
            raise ValueError("failures must be >= 1")
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False

    @property
    def state(self) -> State:
        """The state as of now (an open breaker past its cool-down reads half-open)."""
        if self._state is State.OPEN and self.clock() - self._opened_at >= self.cooldown:
            return State.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """May a call go to this backend now?  (Takes the probe slot when half-open.)"""
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.OPEN:
            return False
        # half-open: one probe at a time
        if self._probe_out:
            return False
        self._state = State.HALF_OPEN
        self._probe_out = True
        return True

    def record_success(self) -> None:
        self._state = State.CLOSED
        self._failures = 0
        self._probe_out = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is State.HALF_OPEN or self._failures >= self.threshold:
            self._state = State.OPEN
            self._opened_at = self.clock()
        self._probe_out = False

    def release(self) -> None:
        """The call ended with no verdict on health; free the probe slot."""
        self._probe_out = False

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self.state.value}, failures={self._failures})"
