"""``Spend``: the one object the service and the router ask about money and limits.

- ``admit(key, model)`` before a request reaches the router: the key's model
  list (PERMISSION_DENIED, 403) and its rate limits (``SpendLimit``, 429);
  returns the ``x-ratelimit-*`` headers for a limited key's answer.
- ``blocked(backend)`` for each target the router would try: a cloud backend
  while a budget of the call's key (or the global one) is reached is
  skipped with a ``SpendLimit`` (fallback reason BUDGET); when nothing else
  could answer, that is the answer (429 naming the budget and its reset).
- ``finished(...)`` when a request ends: its cost (``prices``) counts against
  the budgets and the key's token limit at once, goes to the metrics, and a
  row goes to the ledger's queue (written by its own thread).
- ``report(...)`` / ``scopes()``: what ``GetUsage`` answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable, Optional, Sequence

from prometheus_client import CollectorRegistry

from backends import call_context
from backends.errors import PermissionDenied, ResourceExhausted
from backends.spend.budgets import Budgets, Reached, Scope
from backends.spend.ledger import FILENAME, Ledger, UsageRow
from backends.spend.limits import RateLimited, RateLimiter
from backends.spend.metrics import BudgetCollector, SpendMetrics
from backends.spend.prices import PriceBook
from mlxgate.config import Config
from mlxgate.keyring import KeyRing, NamedKey
from mlxgate.limits import clip_name

log = logging.getLogger(__name__)

#: Trailing metadata saying a RESOURCE_EXHAUSTED is the caller's limit, not a
#: busy server: "budget" or "rate" (the front answers 429 in every dialect).
LIMIT_KEY = "x-mlxgate-limit"

#: The key label and ledger name of a caller without a key (no keys configured).
NO_KEY = "none"


class SpendLimit(ResourceExhausted):
    """A reached budget or rate limit; ``trailers`` tell the front which, and
    carry the ``x-ratelimit-*`` values."""

    def __init__(self, message: str, retry_after: float, kind: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message, retry_after=retry_after)
        self.kind = kind
        self.trailers: tuple[tuple[str, str], ...] = ((LIMIT_KEY, kind), *(headers or {}).items())


class Spend:
    def __init__(self, config: Config, keyring: KeyRing, registry: Optional[CollectorRegistry] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.keyring = keyring
        self.clock = clock
        self.prices = PriceBook(config.cloud.providers)
        self.budgets = Budgets(config.budget, clock)
        self.limiter = RateLimiter()
        self.ledger: Optional[Ledger] = None
        if config.usage.ledger:
            self.ledger = Ledger(config.data_path() / FILENAME, config.usage.retention_days, clock)
        self.metrics = SpendMetrics(registry) if registry is not None else None
        if registry is not None:
            registry.register(BudgetCollector(lambda: self.scopes()))
        self._key_limits = {k.name: k.cloud_usd_per_day for k in keyring.keys() if k.cloud_usd_per_day is not None}

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        """Open the ledger and read this day's and month's spend back from it."""
        if self.ledger is None:
            return
        ledger = self.ledger

        def load() -> None:
            if ledger.open():
                month = ledger.spent_since(self.budgets.month_start)
                day = ledger.spent_since(self.budgets.day_start)
                self.budgets.load(month, day)

        await asyncio.to_thread(load)

    async def close(self) -> None:
        """Write every queued row (after the requests in flight ended)."""
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.close)

    # ------------------------------------------------------------ admission

    def admit(self, key: Optional[NamedKey], model: str) -> dict[str, str]:
        if key is None:
            return {}
        if not key.allows(model):
            raise PermissionDenied(f"key '{key.name}' may not use model '{clip_name(model)}' (allowed: "
                                   + ", ".join(sorted(m for m in key.models if ":" not in m)[:16]) + ")")
        try:
            return self.limiter.admit(key)
        except RateLimited as e:
            raise SpendLimit(e.message, e.retry_after, "rate", e.headers) from None

    def blocked(self, backend: str) -> Optional[SpendLimit]:
        """Why ``backend`` may not be called for the current call now (a budget), or None."""
        if not self.prices.paid(backend):
            return None
        name = call_context.key()
        reached = self.budgets.reached(name, self._key_limits.get(name))
        return None if reached is None else self._limit(reached)

    def _limit(self, reached: Reached) -> SpendLimit:
        wait = max(1.0, math.ceil(reached.resets_at - self.clock()))
        return SpendLimit(reached.message(), wait, "budget")

    def rate_headers(self, key: Optional[NamedKey]) -> dict[str, str]:
        return self.limiter.headers(key) if key is not None and key.rate_limited else {}

    # ------------------------------------------------------------ accounting

    def finished(self, key: Optional[NamedKey], dialect: str, backend: str, model: str, prompt_tokens: int,
                 completion_tokens: int, cached_tokens: int, outcome: str) -> None:
        name = key.name if key is not None else NO_KEY
        cost = self.prices.cost(backend, model, prompt_tokens, completion_tokens, cached_tokens)
        if self.prices.paid(backend):
            self.budgets.add(name, cost)
        if key is not None:
            self.limiter.used(key, prompt_tokens + completion_tokens)
        if self.metrics is not None:
            self.metrics.observe(backend, model, name, prompt_tokens, completion_tokens, cached_tokens, cost)
        if self.ledger is not None:
            self.ledger.record(UsageRow(self.clock(), name, dialect or "grpc", backend, model, prompt_tokens,
                                        completion_tokens, cached_tokens, cost, outcome))

    # ------------------------------------------------------------ reading

    def scopes(self) -> list[Scope]:
        return self.budgets.scopes(self._key_limits)

    async def report(self, since: Optional[float], until: Optional[float], group_by: Sequence[str]) -> list[dict]:
        if self.ledger is None:
            return []
        return await asyncio.to_thread(self.ledger.report, since, until, group_by)
