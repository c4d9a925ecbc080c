"""Spend on /metrics: cost and tokens by backend, model and key name, and
what is left of each budget (read at scrape time).

The key label is a configured name (``key-1``, a ``[[keys]]`` name) or
"none" without keys: bounded by the configuration, never a secret.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mlxgate.prom import Children

PREFIX = "mlxgate"


class SpendMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.cost = Counter(f"{PREFIX}_cost_usd", "What requests cost, USD (cloud prices; local backends cost 0).",
                            ["backend", "model", "key"], registry=registry)
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens by direction (prompt, completion, cached), backend, "
                              "model and key.", ["direction", "backend", "model", "key"], registry=registry)
        self.c_cost = Children(self.cost)
        self.c_tokens = Children(self.tokens)

    def observe(self, backend: str, model: str, key: str, prompt: int, completion: int, cached: int,
                cost: float) -> None:
        self.c_cost(backend, model, key).inc(cost)
        self.c_tokens("prompt", backend, model, key).inc(prompt)
        self.c_tokens("completion", backend, model, key).inc(completion)
        self.c_tokens("cached", backend, model, key).inc(cached)


class BudgetCollector(Collector):
    """``mlxgate_budget_remaining_usd{scope}`` for each budget that has a limit."""

    def __init__(self, scopes: Callable[[], Iterable]) -> None:
        self.scopes = scopes

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily(f"{PREFIX}_budget_remaining_usd",
                              "Cloud budget left in the current period, USD, by scope (day, month, key:<name>).",
                              labels=["scope"])
        for s in self.scopes():
            if s.limit is not None:
                g.add_metric([s.scope], max(0.0, s.limit - s.spent))
        yield g
