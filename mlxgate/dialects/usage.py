"""``GET /api/usage``: the query string and the answer (mlxgate's own route).

``since`` / ``until``: an ISO 8601 date or time (``2025-06-01``,
``2025-06-01T12:00:00Z``; without a zone: UTC) or an age (``30m``, ``24h``,
``7d``: that long before now).  ``group_by``: comma-separated ``key``,
``backend``, ``model`` (default all three).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Optional

from typing_extensions import TypedDict

from pydantic import Field

from mlxgate.dialects.base import WireModel

GROUPS = ("key", "backend", "model")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageQuery(WireModel):
    since: Optional[str] = Field(None, max_length=64, description="ISO 8601 date/time (UTC unless it says) or an age "
                                 "such as 24h or 7d; default: the oldest row kept")
    until: Optional[str] = Field(None, max_length=64, description="as since; default: now")
    group_by: Optional[str] = Field(None, max_length=64, description="comma-separated key, backend, model "
                                    "(default all three)")


def parse_time(value: str, now: Optional[float] = None) -> float:
    """Unix seconds of a ``since``/``until`` value; ValueError naming the forms taken."""
    v = value.strip()
    m = _AGE.match(v.lower())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value[:64]!r} is neither an ISO 8601 date/time (2025-06-01, 2025-06-01T12:00:00Z) "
                         "nor an age (30m, 24h, 7d)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def parse_groups(value: Optional[str]) -> list[str]:
    if not value:
        return list(GROUPS)
    groups = [g.strip() for g in value.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)[:64]}; use key, backend, model")
    return groups


class UsageGroup(TypedDict):
    key: str
    backend: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float


class BudgetScope(TypedDict):
    spent_usd: float
    limit_usd: Optional[float]
    remaining_usd: Optional[float]
    resets_at: str


class UsageResponse(TypedDict):
    by: list[UsageGroup]
    #: By scope: "day", "month" (all keys' cloud spend), "key:<name>".
    budget: dict[str, BudgetScope]
