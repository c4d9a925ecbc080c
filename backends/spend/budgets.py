"""Cloud budgets: spend per day and month (all keys), and per key per day.

Periods begin at midnight and on the 1st in ``[budget] timezone`` (UTC by
default).  Spend is kept in memory, added when a request ends, and read
back from the ledger at start-up, so it survives a restart.  A budget is
reached once the period's spend is at or above it: until the period resets
cloud backends are skipped.  Requests already running when it is reached
finish, so spend may overshoot by what those cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Optional
from zoneinfo import ZoneInfo

from mlxgate.config import BudgetConfig


@dataclass(frozen=True)
class Reached:
    """A budget that is spent: which, how much, and when it resets."""

    scope: str  # "day", "month" or "key:<name>"
    limit: float
    spent: float
    resets_at: float  # unix seconds

    def message(self) -> str:
        when = datetime.fromtimestamp(self.resets_at).astimezone().isoformat(timespec="seconds")
        if self.scope.startswith("key:"):
            whose = f"daily cloud budget of key '{self.scope[4:]}'"
        else:
            whose = f"{'daily' if self.scope == 'day' else 'monthly'} cloud budget"
        return (f"cloud budget reached: the {whose} of ${self.limit:.2f} is spent "
                f"(${self.spent:.4f}); cloud models are unavailable until it resets at {when}")


@dataclass(frozen=True)
class Scope:
    scope: str
    spent: float
    limit: Optional[float]
    resets_at: float


class Periods:
    """Where the current day and month began and end, in one time zone."""

    def __init__(self, timezone: str = "UTC") -> None:
        self.tz = ZoneInfo(timezone)

    def day(self, now: float) -> tuple[float, float]:
        t = datetime.fromtimestamp(now, self.tz)
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=1, hours=2)).replace(hour=0)  # across a DST change too
        return start.timestamp(), end.timestamp()

    def month(self, now: float) -> tuple[float, float]:
        t = datetime.fromtimestamp(now, self.tz)
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
        return start.timestamp(), end.timestamp()


class Budgets:
    def __init__(self, config: BudgetConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.periods = Periods(config.timezone)
        self._day = self.periods.day(clock())
        self._month = self.periods.month(clock())
        self.day_spent = 0.0
        self.month_spent = 0.0
        self.key_day_spent: dict[str, float] = {}

    def load(self, month_by_key: dict[str, float], day_by_key: dict[str, float]) -> None:
        """Spend already recorded this month and this day (from the ledger)."""
        self.month_spent = sum(month_by_key.values())
        self.day_spent = sum(day_by_key.values())
        self.key_day_spent = dict(day_by_key)

    def _roll(self) -> None:
        now = self.clock()
        if now >= self._day[1]:
            self._day = self.periods.day(now)
            self.day_spent = 0.0
            self.key_day_spent.clear()
        if now >= self._month[1]:
            self._month = self.periods.month(now)
            self.month_spent = 0.0

    @property
    def day_start(self) -> float:
        return self._day[0]

    @property
    def month_start(self) -> float:
        return self._month[0]

    def add(self, key: str, cost: float) -> None:
        """A cloud request's cost, once it ended."""
        if cost <= 0:
            return
        self._roll()
        self.day_spent += cost
        self.month_spent += cost
        self.key_day_spent[key] = self.key_day_spent.get(key, 0.0) + cost

    def reached(self, key: str = "", key_limit: Optional[float] = None) -> Optional[Reached]:
        """The first spent budget for a request of ``key`` (whose own daily limit is ``key_limit``)."""
        self._roll()
        c = self.config
        if c.cloud_usd_per_month is not None and self.month_spent >= c.cloud_usd_per_month:
            return Reached("month", c.cloud_usd_per_month, self.month_spent, self._month[1])
        if c.cloud_usd_per_day is not None and self.day_spent >= c.cloud_usd_per_day:
            return Reached("day", c.cloud_usd_per_day, self.day_spent, self._day[1])
        if key_limit is not None:
            spent = self.key_day_spent.get(key, 0.0)
            if spent >= key_limit:
                return Reached(f"key:{key}", key_limit, spent, self._day[1])
        return None

    def scopes(self, key_limits: dict[str, float]) -> list[Scope]:
        """Every budget's spend, limit (None: unlimited) and reset time."""
        self._roll()
        c = self.config
        out = [Scope("day", self.day_spent, c.cloud_usd_per_day, self._day[1]),
               Scope("month", self.month_spent, c.cloud_usd_per_month, self._month[1])]
        for name, limit in key_limits.items():
            out.append(Scope(f"key:{name}", self.key_day_spent.get(name, 0.0), limit, self._day[1]))
        return out
