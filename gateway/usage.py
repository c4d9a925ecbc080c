"""``GET /api/usage``: the usage ledger and the budgets, through ``GetUsage``.

With keys set only admin keys may read it (403 otherwise, before the
service is called); the service checks again (this front vouches for the
caller, ``gateway/caller.py``).
"""

from __future__ import annotations

from datetime import timezone

from aiohttp import web

from gateway.errors import ApiError, bad_request
from gateway.parsing import read_query
from gateway.render import json_response
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import CALLER, client, request_id
from mlxgate.admin import USAGE_NEEDS_ADMIN
from mlxgate.dialects import usage as wire
from mlxgate.v1 import inference_pb2 as pb

PATH = "/api/usage"


def _timestamp(value: str, name: str) -> float:
    try:
        return wire.parse_time(value)
    except ValueError as e:
        raise bad_request(f"{name}: {e}", param=name) from None


def usage_json(res: pb.GetUsageResponse) -> wire.UsageResponse:
    by: list[wire.UsageGroup] = [
        {"key": g.key, "backend": g.backend, "model": g.model, "requests": g.requests,
         "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
         "cached_tokens": g.cached_tokens, "cost_usd": g.cost_usd} for g in res.by]
    budget: dict[str, wire.BudgetScope] = {}
    for s in res.budget:
        limit = s.limit_usd if s.HasField("limit_usd") else None
        budget[s.scope] = {
            "spent_usd": s.spent_usd, "limit_usd": limit,
            "remaining_usd": None if limit is None else max(0.0, limit - s.spent_usd),
            "resets_at": s.resets_at.ToDatetime(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z"),
        }
    return {"by": by, "budget": budget}


async def usage(request: web.Request) -> web.Response:
    caller = request.get(CALLER)
    if caller is not None and not caller.admin:
        raise ApiError(403, USAGE_NEEDS_ADMIN, code="admin_key_required")
    q = read_query(request, wire.UsageQuery, PATH)
    req = pb.GetUsageRequest()
    if q.since:
        req.since.FromSeconds(int(_timestamp(q.since, "since")))
    if q.until:
        req.until.FromSeconds(int(_timestamp(q.until, "until")))
    try:
        req.group_by.extend(wire.parse_groups(q.group_by))
    except ValueError as e:
        raise bad_request(f"group_by: {e}", param="group_by") from None
    res = await client(request).get_usage(req, request_id(request))
    return json_response(usage_json(res))


ROUTES: list[Route] = [
    Route("GET", PATH, usage, "Usage and spend by key, backend and model; budgets", answer=wire.UsageResponse,
          query=wire.UsageQuery, statuses=(400,),
          description="Totals from the usage ledger and each cloud budget's spend, limit and reset. With API keys "
                      "set, admin keys only."),
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
