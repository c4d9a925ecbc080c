"""The router: one Backend in front of MLX, an upstream Ollama and cloud APIs.

Resolution.  A public model name maps to an ordered list of targets
(backend, name at that backend):

* when ``aliases`` has the name, its entries in order -- "mlx:<name>",
  "ollama:<tag>", "cloud:<provider>:<model>" -- and nothing else (an alias is
  an explicit routing decision; entries naming a backend that is not
  configured are skipped);
* otherwise every backend whose ``list_models`` has the name, in the
  priority order the backends were given (MLX, Ollama, cloud providers).
  Model lists are cached for ``RouterConfig.model_list_ttl`` seconds; a
  backend whose listing fails is skipped (and that failure is cached too).

"x" and "x:latest" name the same model everywhere.

Fallback.  ``generate`` tries targets in order.  A retryable ``BackendError``
(Unavailable, ResourceExhausted, DeadlineExceeded, ModelNotFound,
Unimplemented) raised *before the first event* moves on to the next target;
once an event has reached the caller, any failure is re-raised (the stream
ends with an error, never a splice of two answers).  Non-retryable errors
(InvalidArgument, Unauthenticated, PermissionDenied, ...) propagate at once.
At most ``RouterConfig.retry_budget`` targets are tried per request.
Embeddings given as token ids go only to targets whose backend takes them
(``takes_token_ids``: the MLX engine); the others are never tried.

Circuit breakers.  Each backend has a ``CircuitBreaker``; an open one is
skipped without a call.  Health failures are Unavailable and
DeadlineExceeded (connection errors arrive as Unavailable); any answer from
the backend, errors such as ModelNotFound included, counts as success.

Who answered.  ``Done.backend`` is always the name of the backend that
answered; ``Done.model`` is the model name *at that backend* (what the
backend reported, or the name the router sent it when it reported none),
e.g. "llama3.2:latest" at Ollama for a request of "llama3.2".  The caller
knows the public name it asked for; ``Done.model`` tells it what actually ran.

Observer.  An optional object with ``fallback(from_backend, to_backend,
reason)`` and ``answered(backend, model)``.  Labels are bounded: backend names
come from configuration, ``reason`` is one of ``REASONS`` (gRPC code names), and ``model`` is a
name at the backend that came from its model list or the alias table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Optional, Protocol, Sequence, TypeVar

from backends.base import Backend
from backends.breaker import CircuitBreaker, Clock
from backends.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    Unavailable,
    Unimplemented,
)
from backends.types import (
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    GenerateRequest,
    LoadResult,
    ModelInfo,
    ModelShow,
    RunningModel,
    TokenCount,
)
from mlxgate.config import RouterConfig
from mlxgate.limits import MAX_NAMES_IN_ERROR, clip_name
from mlxgate.names import untagged

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Every ``reason`` the observer can see: the gRPC code name of the error that
#: made the router move on, or CIRCUIT_OPEN when the backend was skipped.
REASONS = (
    "UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "UNIMPLEMENTED",
    "INTERNAL",
    "CIRCUIT_OPEN",
)
CIRCUIT_OPEN = "CIRCUIT_OPEN"


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


class RouterObserver(Protocol):
    def fallback(self, from_backend: str, to_backend: str, reason: str) -> None: ...

    def answered(self, backend: str, model: str) -> None: ...


def _reason(e: BaseException) -> str:
    if isinstance(e, BackendError) and e.code.name in REASONS:
        return e.code.name
    return "INTERNAL"


class _CircuitOpen(Unavailable):
    """A target skipped because its breaker is open (never raised by a backend)."""


def _is_health_failure(e: BaseException) -> bool:
    return isinstance(e, (Unavailable, DeadlineExceeded))


@dataclass
class Target:
    backend: Backend
    model: str  # the name at that backend


@dataclass
class _Listing:
    expires_at: float
    models: Optional[list[ModelInfo]]  # None: the listing failed


class _Attempts:
    """The targets one request actually calls, in order: at most the retry
    budget of them, skipping backends whose circuit is open, and reporting
    each move to a next backend as a fallback (from the last miss).

    Iterate for (target, breaker); call ``failed`` when a target's failure
    lets the request go on.  ``errors`` collects every miss for the final error.
    """

    def __init__(self, router: Router, targets: Sequence[Target]) -> None:
        self._router = router
        self._targets = targets
        self.errors: list[BackendError] = []
        self._pending: Optional[tuple[str, str]] = None  # (from backend, reason) of the last miss

    def __iter__(self) -> Iterator[tuple[Target, CircuitBreaker]]:
        budget = max(1, self._router.rc.retry_budget)
        tried = 0
        for target in self._targets:
            if tried >= budget:
                return
            name = target.backend.name
            breaker = self._router.breakers[name]
            if not breaker.allow():
                log.debug("%s skipped: circuit open", name)
                self.failed(name, _CircuitOpen(f"{name}: circuit open after repeated failures"), CIRCUIT_OPEN)
                continue
            tried += 1
            if self._pending is not None:
                self._router._fallback(self._pending[0], name, self._pending[1])
            yield target, breaker

    def failed(self, backend: str, error: BackendError, reason: str) -> None:
        self.errors.append(error)
        self._pending = (backend, reason)

class Router:
    """A Backend that routes each request over ``backends`` (priority order)."""

    name = "router"

    def __init__(
        self,
        backends: Sequence[Backend],
        config: Optional[RouterConfig] = None,
        aliases: Optional[Mapping[str, Sequence[str]]] = None,
        *,
        observer: Optional[RouterObserver] = None,
        clock: Clock = time.monotonic,
    ) -> None:
        """``config``: the ``[router]`` section; ``aliases``: public name ->
        ordered targets ("mlx:<name>", "ollama:<tag>", "cloud:<provider>:<model>")."""
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique, got {names}")
        self.backends = list(backends)
        self.rc = config if config is not None else RouterConfig()
        self.aliases: dict[str, list[str]] = {k: list(v) for k, v in (aliases or {}).items()}
        self.observer = observer
        self.clock = clock
        self._by_name = {b.name: b for b in self.backends}
        self.breakers = {
            b.name: CircuitBreaker(self.rc.breaker_failures, self.rc.breaker_cooldown, clock) for b in self.backends
        }
        self._listings: dict[str, _Listing] = {}
        self._list_locks = {b.name: asyncio.Lock() for b in self.backends}
        self._warned_aliases: set[str] = set()

    # ------------------------------------------------------------ observer

    def _fallback(self, src: str, dst: str, reason: str) -> None:
        log.info("fallback %s -> %s (%s)", src, dst, reason)
        if self.observer is not None:
            try:
                self.observer.fallback(src, dst, reason)
            except Exception:
                log.exception("router observer failed")

    def _answered(self, backend: str, model: str) -> None:
        if self.observer is not None:
            try:
                self.observer.answered(backend, model)
            except Exception:
                log.exception("router observer failed")

    # ------------------------------------------------------------ model lists

    async def _models_of(self, backend: Backend) -> Optional[list[ModelInfo]]:
        """The backend's model list (cached), or None when it cannot be had now."""
        now = self.clock()
        cached = self._listings.get(backend.name)
        if cached is not None and cached.expires_at > now:
            return cached.models
        async with self._list_locks[backend.name]:
            cached = self._listings.get(backend.name)
            now = self.clock()
            if cached is not None and cached.expires_at > now:
                return cached.models
            breaker = self.breakers[backend.name]
            if not breaker.allow():
                # Open circuit: reuse a stale list if there is one, else skip.
                return cached.models if cached is not None else None
            models: Optional[list[ModelInfo]]
            try:
                try:
                    models = await asyncio.wait_for(backend.list_models(), LIST_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"{backend.name}: listing models timed out") from None
            except asyncio.CancelledError:
                breaker.release()
                raise
            except BackendError as e:
                log.warning("%s: listing models failed: %s", backend.name, e.message)
                breaker.record_failure() if _is_health_failure(e) else breaker.release()
                models = None
            except Exception:
                log.exception("%s: listing models failed", backend.name)
                breaker.record_failure()
                models = None
            else:
                breaker.record_success()
            self._listings[backend.name] = _Listing(self.clock() + self.rc.model_list_ttl, models)
            return models

    def invalidate_model_lists(self) -> None:
        self._listings.clear()

    @staticmethod
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

    def _alias_entries(self, public: str) -> Optional[list[str]]:
        aliases = self.aliases
        if public in aliases:
            return aliases[public]
        want = untagged(public)
        for k, v in aliases.items():
            if untagged(k) == want:
                return v
        return None

    def _parse_alias(self, entry: str) -> Optional[Target]:
        if entry.startswith("cloud:"):
            parts = entry.split(":", 2)
            if len(parts) != 3 or not parts[2]:
                return self._bad_alias(entry)
            backend_name, model = f"cloud:{parts[1]}", parts[2]
        else:
            backend_name, sep, model = entry.partition(":")
            if not sep or not model:
                return self._bad_alias(entry)
        backend = self._by_name.get(backend_name)
        if backend is None:
            return self._bad_alias(entry, f"backend {backend_name} is not configured")
        return Target(backend, model)

    def _bad_alias(
        self, entry: str, why: str = "expected mlx:<name>, ollama:<tag> or cloud:<provider>:<model>"
    ) -> None:
        if entry not in self._warned_aliases:
            self._warned_aliases.add(entry)
            log.warning("alias target %r skipped: %s", entry, why)
        return None

    async def targets(self, public: str) -> list[Target]:
        """Ordered (backend, name at backend) for a public name."""
        entries = self._alias_entries(public)
        if entries is not None:
            return [t for t in (self._parse_alias(e) for e in entries) if t is not None]
        listings = await asyncio.gather(*(self._models_of(b) for b in self.backends))
        out = []
        for backend, models in zip(self.backends, listings):
            found = self._find(models, public)
            if found is not None:
                out.append(Target(backend, found.name))
        return out

    async def _not_found(self, public: str) -> ModelNotFound:
        names = [m.name for m in await self.list_models()]
        msg = f"model '{clip_name(public)}' not found; {available(names)}"
        unreachable = [b.name for b in self.backends if (lst := self._listings.get(b.name)) and lst.models is None]
        if unreachable:
            msg += f" (could not list: {', '.join(unreachable)})"
        return ModelNotFound(msg)

    # ------------------------------------------------------------ generate

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        targets = await self.targets(req.model)
        if not targets:
            raise await self._not_found(req.model)
        attempts = _Attempts(self, targets)
        for target, breaker in attempts:
            backend = target.backend
            sub = dataclasses.replace(req, model=target.model)
            emitted = False
            verdict = False
            try:
                async with contextlib.aclosing(backend.generate(sub)) as events:
                    async for event in events:
                        if isinstance(event, Done) or not emitted:
                            # Done always says who answered; so does the first chunk.
                            event.backend = backend.name
                            event.model = event.model or target.model
                        if not emitted:
                            emitted = True
                            breaker.record_success()
                            verdict = True
                            self._answered(backend.name, target.model)
                        yield event
                if not emitted:  # a backend that yields nothing is broken
                    raise Unavailable(f"{backend.name}: ended without an answer")
                return
            except BackendError as e:
                if not verdict or (emitted and _is_health_failure(e)):
                    # (a backend that keeps dying mid-stream trips its breaker too)
                    verdict = True
                    breaker.record_failure() if _is_health_failure(e) else breaker.record_success()
                if emitted or not e.retryable:
                    raise
                log.info("%s failed before the first token for %s: %s", backend.name, req.model, e.message)
                attempts.failed(backend.name, e, _reason(e))
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception:
                if not verdict:
                    verdict = True
                    breaker.record_failure()
                if emitted:
                    raise
                log.exception("%s failed before the first token for %s", backend.name, req.model)
                attempts.failed(backend.name, Unavailable(f"{backend.name}: internal error"), "INTERNAL")
            finally:
                if not verdict:
                    breaker.release()
        raise await self._exhausted(req.model, attempts.errors)

    async def _exhausted(self, public: str, errors: list[BackendError]) -> BackendError:
        """The error for a request no target could answer."""
        if errors and all(isinstance(e, ModelNotFound) for e in errors):
            return await self._not_found(public)
        real = [e for e in errors if not isinstance(e, ModelNotFound)]
        # The most telling failure: the last one a backend actually raised
        # (a "circuit open" note only when nothing else happened).
        for e in reversed(real):
            if not isinstance(e, _CircuitOpen):
                return e
        if real:
            return Unavailable(f"model '{clip_name(public)}': every backend is unavailable ("
                               + "; ".join(e.message for e in real) + ")")
        return await self._not_found(public)

    # ------------------------------------------------------------ unary calls

    async def _first(
        self,
        public: str,
        what: str,
        call: Callable[[Backend, str], Awaitable[T]],
        targets: Optional[list[Target]] = None,
    ) -> tuple[Target, T]:
        """Run ``call`` on targets (default: all of ``public``'s) in order; the
        first success wins (same rules as generate)."""
        if targets is None:
            targets = await self.targets(public)
        if not targets:
            raise await self._not_found(public)
        attempts = _Attempts(self, targets)
        for target, breaker in attempts:
            backend = target.backend
            try:
                result = await call(backend, target.model)
            except asyncio.CancelledError:
                breaker.release()
                raise
            except BackendError as e:
                breaker.record_failure() if _is_health_failure(e) else breaker.record_success()
                if not e.retryable:
                    raise
                log.info("%s: %s failed for %s: %s", backend.name, what, public, e.message)
                attempts.failed(backend.name, e, _reason(e))
                continue
            except Exception:
                breaker.record_failure()
                log.exception("%s: %s failed for %s", backend.name, what, public)
                attempts.failed(backend.name, Unavailable(f"{backend.name}: internal error"), "INTERNAL")
                continue
            breaker.record_success()
            return target, result
        raise await self._exhausted(public, attempts.errors)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        targets = await self.targets(req.model)
        if req.input_tokens:
            targets = self._taking_token_ids(req.model, targets)
        target, result = await self._first(
            req.model, "embed", lambda b, name: b.embed(dataclasses.replace(req, model=name)), targets
        )
        result.backend = target.backend.name
        result.model = result.model or target.model
        self._answered(target.backend.name, target.model)
        return result

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        """Counted by the first target that can count (the MLX engine renders and
        tokenizes; an Anthropic provider asks its API); backends that cannot
        (an upstream Ollama, OpenAI-compatible clouds) answer Unimplemented and
        the next is asked, as for any retryable failure."""

        async def count(b: Backend, name: str) -> TokenCount:
            method = getattr(b, "count_tokens", None)
            if method is None:
                raise Unimplemented(f"{b.name}: counting tokens is not supported")
            return await method(dataclasses.replace(req, model=name))

        target, result = await self._first(req.model, "count_tokens", count)
        result.backend = target.backend.name
        result.model = result.model or target.model
        return result

    @staticmethod
    def _taking_token_ids(public: str, targets: list[Target]) -> list[Target]:
        """The targets that can embed token ids (``Backend.takes_token_ids``).

        Ids are a model's own tokenizer's: sent to another backend's model they
        would be other words, a wrong answer nobody could see.  So the others are
        not tried at all -- when the local engine fails, its own error is the
        answer -- and a model only they serve is the caller's error.
        """
        able = [t for t in targets if getattr(t.backend, "takes_token_ids", False)]
        if targets and not able:
            names = ", ".join(dict.fromkeys(t.backend.name for t in targets))
            raise InvalidArgument(
                f"model '{clip_name(public)}' is served by {names}, which cannot embed token ids: token ids "
                "are taken only for models this server runs itself (MLX); send the input as text"
            )
        return able

    async def show_model(self, name: str) -> ModelShow:
        target, show = await self._first(name, "show_model", lambda b, n: b.show_model(n))
        show.info.backend = target.backend.name
        others = [t.backend.name for t in await self.targets(name) if t.backend is not target.backend]
        show.info.fallbacks = others
        return show

    async def load_model(self, name: str, keep_alive: Optional[float]) -> LoadResult:
        target, res = await self._first(name, "load_model", lambda b, n: b.load_model(n, keep_alive))
        res.backend = target.backend.name
        return res

    async def unload_model(self, name: str) -> bool:
        """Unload from every target that has it loaded (a model may be resident at
        two backends); True when any had it.  Errors only when every target failed."""
        targets = await self.targets(name)
        if not targets:
            raise await self._not_found(name)
        was = False
        errors: list[BackendError] = []
        for target in targets:
            breaker = self.breakers[target.backend.name]
            if not breaker.allow():
                continue
            try:
                was = await target.backend.unload_model(target.model) or was
            except asyncio.CancelledError:
                breaker.release()
                raise
            except BackendError as e:
                breaker.record_failure() if _is_health_failure(e) else breaker.record_success()
                errors.append(e)
                continue
            except Exception:
                breaker.record_failure()
                log.exception("%s: unload_model failed", target.backend.name)
                errors.append(Unavailable(f"{target.backend.name}: internal error"))
                continue
            breaker.record_success()
        if not was and errors and len(errors) == len(targets):
            raise await self._exhausted(name, errors)
        return was

    # ------------------------------------------------------------ listings

    async def list_models(self) -> list[ModelInfo]:
        """Union over reachable backends, first backend (priority order) owning
        each name, ``fallbacks`` naming the others; aliases as their own entries."""
        listings = await asyncio.gather(*(self._models_of(b) for b in self.backends))
        owners: dict[str, ModelInfo] = {}
        order: list[str] = []
        for backend, models in zip(self.backends, listings):
            for m in models or []:
                key = untagged(m.name)
                if key in owners:
                    if backend.name != owners[key].backend and backend.name not in owners[key].fallbacks:
                        owners[key].fallbacks.append(backend.name)
                    continue
                info = dataclasses.replace(m, backend=backend.name, fallbacks=[], details=m.details)
                owners[key] = info
                order.append(key)
        by_backend = {b.name: models for b, models in zip(self.backends, listings)}
        for alias, entries in self.aliases.items():
            targets = [t for t in (self._parse_alias(e) for e in entries) if t is not None]
            reachable = [t for t in targets if by_backend.get(t.backend.name) is not None]
            if not reachable:
                continue
            first = reachable[0]
            base = self._find(by_backend.get(first.backend.name), first.model)
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

    async def list_running(self) -> list[RunningModel]:
        async def one(b: Backend) -> list[RunningModel]:
            if not self.breakers[b.name].allow():
                return []
            breaker = self.breakers[b.name]
            try:
                running = await b.list_running()
            except asyncio.CancelledError:
                breaker.release()
                raise
            except Exception as e:
                log.warning("%s: list_running failed: %s", b.name, getattr(e, "message", type(e).__name__))
                if not isinstance(e, BackendError) or _is_health_failure(e):
                    breaker.record_failure()
                else:
                    breaker.release()
                return []
            breaker.record_success()
            for r in running:
                r.backend = r.backend or b.name
            return running

        out: list[RunningModel] = []
        for part in await asyncio.gather(*(one(b) for b in self.backends)):
            out.extend(part)
        return out + self._running_aliases(out)

    def _running_aliases(self, running: list[RunningModel]) -> list[RunningModel]:
        """An alias is running when one of its targets is: it is listed (as a
        copy of the first running target, in the alias's order) so a client
        that shows what is loaded by the name it uses (Open WebUI) sees it.
        An alias whose name is already listed adds nothing."""
        listed = {untagged(r.name) for r in running}
        out = []
        for alias, entries in self.aliases.items():
            if untagged(alias) in listed:
                continue
            for target in (t for t in (self._parse_alias(e) for e in entries) if t is not None):
                hit = next((r for r in running if r.backend == target.backend.name
                            and untagged(r.name) == untagged(target.model)), None)
                if hit is not None:
                    out.append(dataclasses.replace(hit, name=alias))
                    listed.add(untagged(alias))
                    break
        return out

    async def close(self) -> None:
        for b in self.backends:
            try:
                await b.close()
            except Exception:
                log.exception("%s: close failed", b.name)

    # ------------------------------------------------------------ introspection

    @property
    def mlx_backend(self) -> Optional[Backend]:
        """The local engine, when configured (the memory collector reads it)."""
        return self._by_name.get("mlx")

    def alias_backend_orders(self) -> list[list[str]]:
        """Each alias's backends in its order (the fallbacks it can cause)."""
        orders = []
        for entries in self.aliases.values():
            orders.append([t.backend.name for t in (self._parse_alias(e) for e in entries) if t is not None])
        return orders

    def breaker_states(self) -> dict[str, str]:
        return {name: br.state.value for name, br in self.breakers.items()}

    def __repr__(self) -> str:
        return f"Router({[b.name for b in self.backends]})"

