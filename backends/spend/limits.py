"""Per-key rate limits: requests and tokens per minute, over a sliding minute.

Counts are kept in one-second buckets (at most 60 per key and kind), so a
key's state is bounded whatever its traffic.  A request counts when it is
admitted; its tokens (prompt + completion) when it ends, so a key may go
over its token limit by the requests it already has running, and the next
one waits until the minute has room again.  What the headers say follows
OpenAI's: ``x-ratelimit-limit-requests``, ``-remaining-requests``,
``-reset-requests`` (a duration, "12s"), and the same for ``-tokens``.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Callable, Optional

from mlxgate.keyring import NamedKey

WINDOW_S = 60


class _Window:
    """Amounts in one-second buckets over the last minute."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: collections.deque[list[float]] = collections.deque()  # [second, amount]
        self.total = 0.0

    def trim(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] <= now - WINDOW_S:
            self.total -= self.buckets.popleft()[1]

    def add(self, now: float, amount: float) -> None:
        second = math.floor(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += amount
        else:
            self.buckets.append([second, amount])
        self.total += amount

    def free_after(self, now: float, limit: float) -> float:
        """Seconds until the total drops below ``limit``."""
        total = self.total
        for second, amount in self.buckets:
            total -= amount
            if total < limit:
                return max(1.0, second + WINDOW_S - now)
        return float(WINDOW_S)


def _duration(seconds: float) -> str:
    s = max(0, math.ceil(seconds))
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers = headers


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}

    def _windows(self, name: str, now: float) -> tuple[_Window, _Window]:
        r = self._requests.setdefault(name, _Window())
        t = self._tokens.setdefault(name, _Window())
        r.trim(now)
        t.trim(now)
        return r, t

    def admit(self, key: NamedKey) -> dict[str, str]:
        """Count one request of ``key``; raise ``RateLimited`` when over a limit.
        Returns the headers for the answer (empty for a key without limits)."""
        if not key.rate_limited:
            return {}
        now = self.clock()
        r, t = self._windows(key.name, now)
        rpm, tpm = key.requests_per_minute, key.tokens_per_minute
        if rpm is not None and r.total >= rpm:
            wait = r.free_after(now, rpm)
            raise RateLimited(f"rate limit reached for key '{key.name}': {rpm} requests per minute; "
                              f"try again in {_duration(wait)}", wait, self.headers(key, now))
        if tpm is not None and t.total >= tpm:
            wait = t.free_after(now, tpm)
            raise RateLimited(f"rate limit reached for key '{key.name}': {tpm} tokens per minute; "
                              f"try again in {_duration(wait)}", wait, self.headers(key, now))
        r.add(now, 1)
        return self.headers(key, now)

    def used(self, key: NamedKey, tokens: int) -> None:
        if key.tokens_per_minute is None or tokens <= 0:
            return
        now = self.clock()
        _, t = self._windows(key.name, now)
        t.add(now, tokens)

    def headers(self, key: NamedKey, now: Optional[float] = None) -> dict[str, str]:
        now = self.clock() if now is None else now
        r, t = self._windows(key.name, now)
        out: dict[str, str] = {}
        for kind, limit, window in (("requests", key.requests_per_minute, r), ("tokens", key.tokens_per_minute, t)):
            if limit is None:
                continue
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(limit - window.total)))
            reset = window.free_after(now, limit) if window.total >= limit else (
                window.buckets[0][0] + WINDOW_S - now if window.buckets else 0.0)
            out[f"x-ratelimit-reset-{kind}"] = _duration(reset)
        return out
