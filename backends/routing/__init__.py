"""The router, in three parts: ``catalogue`` (public names → targets),
``placement`` (which engine, by warmth and load) and ``failover`` (breakers,
the retry budget, moving on before the first event); ``router`` composes
them into the one Backend the service calls."""

from backends.routing.failover import REASONS, BudgetGuard
from backends.routing.router import Router, RouterObserver

__all__ = ["REASONS", "BudgetGuard", "Router", "RouterObserver"]
