"""The catalogue: which backends have a public model name, by which name.

A public model name maps to an ordered list of targets (backend, name at
that backend):

* when ``aliases`` has the name, its entries in order -- "mlx:<name>",
  "remote:<name>:<model>", "ollama:<tag>", "cloud:<provider>:<model>" -- and
  nothing else (an alias is an explicit routing decision, kept in its order;
  entries naming a backend that is not configured are skipped, with one
  warning each);
* otherwise every backend whose ``list_models`` has the name, in the
  priority order the backends were given (MLX, remote services, Ollama,
  cloud providers); placement then orders the engines among them
  (``backends/routing/placement.py``).

Model lists are cached for ``RouterConfig.model_list_ttl`` seconds; a
backend whose listing fails is skipped (and that failure is cached too).  A
listing is a call like any other for the backend's breaker; a backend that
is not serving or whose circuit is open keeps its last list, unasked.

"x" and "x:latest" name the same model everywhere.

One hop.  A call another mlxgate forwarded
(``backends.call_context.forwarded``) is served by backends that do not
forward (``forwards`` False or absent): its targets and model list leave the
remote services out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from backends import call_context
from backends.base import Backend, forwards_calls, is_serving
from backends.breaker import CircuitBreaker, Clock, is_health_failure
from backends.errors import BackendError, DeadlineExceeded, ModelNotFound
from backends.types import ModelInfo, RunningModel
from mlxgate.config import RouterConfig
from mlxgate.limits import MAX_NAMES_IN_ERROR, clip_name
from mlxgate.names import untagged

log = logging.getLogger(__name__)

#: A model listing that takes longer than this counts as failed (DEADLINE_EXCEEDED):
#: a hung upstream must not hold every request's routing for its full timeout.
LIST_TIMEOUT_S = 10.0


def available(names: Sequence[str]) -> str:
    """A few of the names a caller could have meant; the whole list is /api/tags."""
    if not names:
        return "no models are available"
    shown = ", ".join(clip_name(n) for n in names[:MAX_NAMES_IN_ERROR])
    if len(names) > MAX_NAMES_IN_ERROR:
        shown += f", ... ({len(names) - MAX_NAMES_IN_ERROR} more: see /api/tags)"
    return f"available models: {shown}"


@dataclass
class Target:
    backend: Backend
    model: str  # the name at that backend


@dataclass
class _Listing:
    expires_at: float
    models: Optional[list[ModelInfo]]  # None: the listing failed


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


class Catalogue:
    """Public names → targets: the alias table and the backends' model lists."""

    def __init__(
        self,
        backends: Sequence[Backend],
        aliases: Mapping[str, Sequence[str]],
        config: RouterConfig,
        *,
        clock: Clock,
        breakers: Mapping[str, CircuitBreaker],
    ) -> None:
        self.backends = list(backends)
        self.aliases: dict[str, list[str]] = {k: list(v) for k, v in aliases.items()}
        self.by_name = {b.name: b for b in self.backends}
        self._ttl = config.model_list_ttl
        self._clock = clock
        self._breakers = breakers
        self._listings: dict[str, _Listing] = {}
        self._list_locks = {b.name: asyncio.Lock() for b in self.backends}
        self._warned_aliases: set[str] = set()

    def usable(self) -> list[Backend]:
        """The backends this call may use: all, but those that forward to
        another mlxgate when the call was itself forwarded (one hop only)."""
        if call_context.forwarded():
            return [b for b in self.backends if not forwards_calls(b)]
        return self.backends

    # ------------------------------------------------------------ model lists

    async def models_of(self, backend: Backend) -> Optional[list[ModelInfo]]:
        """The backend's model list (cached), or None when it cannot be had now."""
        now = self._clock()
        cached = self._listings.get(backend.name)
        if cached is not None and cached.expires_at > now:
            return cached.models
        async with self._list_locks[backend.name]:
            cached = self._listings.get(backend.name)
            now = self._clock()
            if cached is not None and cached.expires_at > now:
                return cached.models
            if not is_serving(backend):
                # Draining or unreachable: keep what it had (it is skipped
                # when routing), neither ask nor cache a failure.
                return cached.models if cached is not None else None
            breaker = self._breakers[backend.name]
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
                breaker.record_failure() if is_health_failure(e) else breaker.release()
                models = None
            except Exception:
                log.exception("%s: listing models failed", backend.name)
                breaker.record_failure()
                models = None
            else:
                breaker.record_success()
            self._listings[backend.name] = _Listing(self._clock() + self._ttl, models)
            return models

    def invalidate(self) -> None:
        """Forget every model list (a model was created, copied or deleted)."""
        self._listings.clear()

    async def _models_of_all(self, usable: list[Backend]) -> list[Optional[list[ModelInfo]]]:
        """``models_of`` each of ``usable``; when every list is cached and
        fresh (nearly every request), read at once, with no task per backend."""
        now = self._clock()
        cached = [self._listings.get(b.name) for b in usable]
        if all(c is not None and c.expires_at > now for c in cached):
            return [c.models for c in cached]  # type: ignore[union-attr]
        return list(await asyncio.gather(*(self.models_of(b) for b in usable)))

    async def listed(self, public: str) -> list[Target]:
        """Every usable backend that lists ``public``, in priority order."""
        usable = self.usable()
        listings = await self._models_of_all(usable)
        out = []
        for backend, models in zip(usable, listings):
            found = _find(models, public)
            if found is not None:
                out.append(Target(backend, found.name))
        return out

    async def list_models(self) -> list[ModelInfo]:
        """Union over reachable backends, first backend (priority order) owning
        each name, ``fallbacks`` naming the others; aliases as their own entries."""
        usable = self.usable()
        listings = await self._models_of_all(usable)
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
            reachable = [t for t in self._parse_all(entries) if by_backend.get(t.backend.name) is not None]
            if not reachable:
                continue
            first = reachable[0]
            base = _find(by_backend.get(first.backend.name), first.model)
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

    async def not_found(self, public: str) -> ModelNotFound:
        """The error for a name no backend has, with a few names it could have meant."""
        names = [m.name for m in await self.list_models()]
        msg = f"model '{clip_name(public)}' not found; {available(names)}"
        usable = self.usable()
        unreachable = [b.name for b in usable if (lst := self._listings.get(b.name)) and lst.models is None]
        if unreachable:
            msg += f" (could not list: {', '.join(unreachable)})"
        resting = [b.name for b in usable if not is_serving(b) and b.name not in self._listings]
        if resting:
            msg += f" (not serving, so not listed: {', '.join(resting)})"
        return ModelNotFound(msg)

    # ------------------------------------------------------------ aliases

    def aliased(self, public: str) -> Optional[list[Target]]:
        """The usable targets of ``public``'s alias, in its order; None when it is no alias."""
        entries = self._alias_entries(public)
        if entries is None:
            return None
        usable = self.usable()
        return [t for t in self._parse_all(entries) if t.backend in usable]

    def running_aliases(self, running: list[RunningModel]) -> list[RunningModel]:
        """An alias is running when one of its targets is: it is listed (as a
        copy of the first running target, in the alias's order) so a client
        that shows what is loaded by the name it uses (Open WebUI) sees it.
        An alias whose name is already listed adds nothing."""
        listed = {untagged(r.name) for r in running}
        out = []
        for alias, entries in self.aliases.items():
            if untagged(alias) in listed:
                continue
            for target in self._parse_all(entries):
                hit = next((r for r in running if r.backend == target.backend.name
                            and untagged(r.name) == untagged(target.model)), None)
                if hit is not None:
                    out.append(dataclasses.replace(hit, name=alias))
                    listed.add(untagged(alias))
                    break
        return out

    def alias_backend_orders(self) -> list[list[str]]:
        """Each alias's backends in its order (the fallbacks it can cause)."""
        return [[t.backend.name for t in self._parse_all(entries)] for entries in self.aliases.values()]

    def _alias_entries(self, public: str) -> Optional[list[str]]:
        aliases = self.aliases
        if public in aliases:
            return aliases[public]
        want = untagged(public)
        for k, v in aliases.items():
            if untagged(k) == want:
                return v
        return None

    def _parse_all(self, entries: Sequence[str]) -> list[Target]:
        return [t for t in (self._parse_alias(e) for e in entries) if t is not None]

    def _parse_alias(self, entry: str) -> Optional[Target]:
        if entry.startswith("remote:"):
            # "remote:<name>:<model>": a name may hold ":" itself (host:port),
            # so the longest configured remote the entry starts with.
            names = [n for n in self.by_name if n.startswith("remote:") and entry.startswith(n + ":")]
            if not names:
                return self._bad_alias(entry, "no configured remote service matches")
            backend_name = max(names, key=len)
            model = entry[len(backend_name) + 1:]
            if not model:
                return self._bad_alias(entry)
            return Target(self.by_name[backend_name], model)
        if entry.startswith("cloud:"):
            parts = entry.split(":", 2)
            if len(parts) != 3 or not parts[2]:
                return self._bad_alias(entry)
            backend_name, model = f"cloud:{parts[1]}", parts[2]
        else:
            backend_name, sep, model = entry.partition(":")
            if not sep or not model:
                return self._bad_alias(entry)
        backend = self.by_name.get(backend_name)
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
