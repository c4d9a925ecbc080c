"""The router: one Backend in front of MLX, remote services, an upstream
Ollama and cloud APIs, made of three parts.

- ``catalogue.py``: a public model name → its targets (backend, name at that
  backend): the alias table, else the backends' cached model lists;
- ``placement.py``: the engines among them ordered by warmth and load;
- ``failover.py``: the targets called in that order, moving on before the
  first event, with a circuit breaker per backend and a retry budget.

Who answered.  ``Done.backend`` is always the name of the backend that
answered; ``Done.model`` is the model name *at that backend* (what the
backend reported, or the name the router sent it when it reported none),
e.g. "llama3.2:latest" at Ollama for a request of "llama3.2".  The caller
knows the public name it asked for; ``Done.model`` tells it what actually ran.

Token ids.  Embeddings given as token ids, tokenize and detokenize go only
to targets whose backend holds the model's tokenizer (``takes_token_ids``:
the MLX engine, remote services); the others are never tried.

Observer.  An optional object with ``fallback(from_backend, to_backend,
reason)`` and ``answered(backend, model)`` (the service's metrics).  Labels
are bounded: backend names come from configuration, ``reason`` is one of
``failover.REASONS`` (gRPC code names), and ``model`` is a name at the
backend that came from its model list or the alias table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import AsyncIterator, Awaitable, Callable, Mapping, Optional, Protocol, Sequence, TypeVar

from backends.base import Backend, is_serving, takes_token_ids
from backends.breaker import CircuitBreaker, Clock, is_health_failure
from backends.errors import BackendError, InvalidArgument, Unavailable, Unimplemented
from backends.routing.catalogue import Catalogue, Target
from backends.routing.failover import BudgetGuard, Failover
from backends.routing.placement import Placement
from backends.types import (
    DetokenizeRequest,
    DetokenizeResult,
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    GenerateRequest,
    LoadResult,
    ModelInfo,
    ModelShow,
    RerankRequest,
    RerankResult,
    RunningModel,
    TokenCount,
    TokenizeRequest,
    TokenizeResult,
)
from mlxgate.config import RouterConfig
from mlxgate.limits import clip_name

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", GenerateRequest, RerankRequest)


class RouterObserver(Protocol):
    def fallback(self, from_backend: str, to_backend: str, reason: str) -> None: ...

    def answered(self, backend: str, model: str) -> None: ...


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
        budgets: Optional[BudgetGuard] = None,
    ) -> None:
        """``config``: the ``[router]`` section; ``aliases``: public name ->
        ordered targets ("mlx:<name>", "remote:<name>:<model>", "ollama:<tag>",
        "cloud:<provider>:<model>")."""
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique, got {names}")
        self.backends = list(backends)
        rc = config if config is not None else RouterConfig()
        self.observer = observer
        breakers = {b.name: CircuitBreaker(rc.breaker_failures, rc.breaker_cooldown, clock) for b in self.backends}
        self.catalogue = Catalogue(self.backends, aliases or {}, rc, clock=clock, breakers=breakers)
        self.placement = Placement(self.backends, rc, clock=clock, breakers=breakers)
        self.failover = Failover(
            breakers, rc.retry_budget, budgets=budgets, on_fallback=self._fallback,
            counted=self.placement.counted, not_found=self.catalogue.not_found,
        )

    async def start(self) -> None:
        """Start what backends run in the background (remote services' health
        watches); otherwise each starts with its first call."""
        for b in self.backends:
            start = getattr(b, "start", None)
            if start is not None:
                await start()

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

    # ------------------------------------------------------------ resolution

    async def targets(self, public: str) -> list[Target]:
        """Ordered (backend, name at backend) for a public name."""
        aliased = self.catalogue.aliased(public)
        if aliased is not None:
            return aliased
        return await self.placement.place(await self.catalogue.listed(public))

    async def _found(self, public: str) -> list[Target]:
        targets = await self.targets(public)
        if not targets:
            raise await self.catalogue.not_found(public)
        return targets

    def invalidate_model_lists(self) -> None:
        self.catalogue.invalidate()

    # ------------------------------------------------------------ generate

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        targets = await self._found(req.model)
        first = True

        def start(b: Backend, name: str) -> AsyncIterator[Event]:
            return b.generate(dataclasses.replace(req, model=name))

        async with contextlib.aclosing(self.failover.stream(req.model, targets, start)) as events:
            async for target, event in events:
                if isinstance(event, Done) or first:
                    # Done always says who answered; so does the first chunk.
                    event.backend = target.backend.name
                    event.model = event.model or target.model
                if first:
                    first = False
                    self._answered(target.backend.name, target.model)
                    self.placement.refresh_soon(target.backend)  # the model is loaded there now
                yield event

    # ------------------------------------------------------------ unary calls

    async def _first(
        self, public: str, what: str, call: Callable[[Backend, str], Awaitable[T]],
        targets: Optional[list[Target]] = None,
    ) -> tuple[Target, T]:
        """Run ``call`` on targets (default: all of ``public``'s) in order; the
        first success wins (same rules as generate)."""
        if targets is None:
            targets = await self.targets(public)
        if not targets:
            raise await self.catalogue.not_found(public)
        return await self.failover.first(public, what, call, targets)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        targets = await self.targets(req.model)
        if req.input_tokens:
            targets = _with_tokenizer(req.model, targets, "cannot embed token ids: token ids are taken only for "
                                      "models this server runs itself (MLX); send the input as text")
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
        target, result = await self._first(req.model, "count_tokens", _optional("count_tokens", req, "counting tokens"))
        result.backend = target.backend.name
        result.model = result.model or target.model
        return result

    async def rerank(self, req: RerankRequest) -> RerankResult:
        """Reranked by the first target that can (the MLX engine, a remote
        service, a cloud provider serving ``/rerank``); the others answer
        Unimplemented and the next is asked."""
        target, result = await self._first(req.model, "rerank", _optional("rerank", req, "reranking"))
        result.backend = target.backend.name
        result.model = result.model or target.model
        self._answered(target.backend.name, target.model)
        return result

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        targets = _with_tokenizer(req.model, await self.targets(req.model), _CANNOT_TOKENIZE)
        target, result = await self._first(
            req.model, "tokenize", lambda b, name: b.tokenize(dataclasses.replace(req, model=name)), targets)
        result.backend = target.backend.name
        return result

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResult:
        targets = _with_tokenizer(req.model, await self.targets(req.model), _CANNOT_TOKENIZE)
        target, result = await self._first(
            req.model, "detokenize", lambda b, name: b.detokenize(dataclasses.replace(req, model=name)), targets)
        result.backend = target.backend.name
        return result

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
        targets = await self._found(name)
        was = False
        errors: list[BackendError] = []
        for target in targets:
            breaker = self.failover.breakers[target.backend.name]
            if not is_serving(target.backend) or not breaker.allow():
                continue
            try:
                was = await target.backend.unload_model(target.model) or was
            except asyncio.CancelledError:
                breaker.release()
                raise
            except BackendError as e:
                breaker.record_failure() if is_health_failure(e) else breaker.record_success()
                errors.append(e)
                continue
            except Exception:
                breaker.record_failure()
                log.exception("%s: unload_model failed", target.backend.name)
                errors.append(Unavailable(f"{target.backend.name}: internal error"))
                continue
            breaker.record_success()
            self.placement.refresh_soon(target.backend)
        if not was and errors and len(errors) == len(targets):
            raise await self.failover.exhausted(name, errors)
        return was

    # ------------------------------------------------------------ listings

    async def list_models(self) -> list[ModelInfo]:
        return await self.catalogue.list_models()

    async def list_running(self) -> list[RunningModel]:
        """Every loaded model, one entry per backend holding it, and the aliases
        of those; placement learns what each engine has loaded from it."""

        async def one(b: Backend) -> list[RunningModel]:
            breaker = self.failover.breakers[b.name]
            if not is_serving(b) or not breaker.allow():
                return []
            try:
                running = await b.list_running()
            except asyncio.CancelledError:
                breaker.release()
                raise
            except Exception as e:
                log.warning("%s: list_running failed: %s", b.name, getattr(e, "message", type(e).__name__))
                if not isinstance(e, BackendError) or is_health_failure(e):
                    breaker.record_failure()
                else:
                    breaker.release()
                return []
            breaker.record_success()
            for r in running:
                r.backend = r.backend or b.name
            self.placement.saw_running(b, running)
            return running

        out: list[RunningModel] = []
        for part in await asyncio.gather(*(one(b) for b in self.catalogue.usable())):
            out.extend(part)
        return out + self.catalogue.running_aliases(out)

    async def close(self) -> None:
        await self.placement.close()
        for b in self.backends:
            try:
                await b.close()
            except Exception:
                log.exception("%s: close failed", b.name)

    # ------------------------------------------------------------ introspection

    @property
    def in_flight(self) -> dict[str, int]:
        """Requests this router has running at each backend (placement's load)."""
        return self.placement.in_flight

    @property
    def mlx_backend(self) -> Optional[Backend]:
        """The local engine, when configured (the memory collector reads it)."""
        return self.catalogue.by_name.get("mlx")

    def fallback_orders(self) -> list[list[str]]:
        """Every order the router can move between backends in, besides the
        priority order (metrics zero these pairs): each alias's, and the
        engines' backwards (placement may put a later one first)."""
        return self.catalogue.alias_backend_orders() + self.placement.engine_orders()

    def health(self) -> dict[str, bool]:
        """Serving or not, for the backends that watch their health (remotes, a
        distributed MLX engine)."""
        return {b.name: is_serving(b) for b in self.backends
                if hasattr(b, "serving") and getattr(b, "watches_health", True)}

    def breaker_states(self) -> dict[str, str]:
        return self.failover.breaker_states()

    def __repr__(self) -> str:
        return f"Router({[b.name for b in self.backends]})"


_CANNOT_TOKENIZE = ("cannot tokenize: tokenize and detokenize work only for models this server runs itself "
                    "(MLX) or another mlxgate service runs")


def _with_tokenizer(public: str, targets: list[Target], cannot: str) -> list[Target]:
    """The targets that hold the model's tokenizer (``takes_token_ids``).

    Token ids are a model's own tokenizer's: sent to another backend's model
    they would be other words, a wrong answer nobody could see; and an
    upstream Ollama or a cloud API has no tokenize endpoint.  So the others
    are not tried at all -- when the local engine fails, its own error is the
    answer -- and a model only they serve is the caller's error.
    """
    able = [t for t in targets if takes_token_ids(t.backend)]
    if targets and not able:
        names = ", ".join(dict.fromkeys(t.backend.name for t in targets))
        raise InvalidArgument(f"model '{clip_name(public)}' is served by {names}, which {cannot}")
    return able


def _optional(method: str, req: R, doing: str) -> Callable[[Backend, str], Awaitable]:
    """A call of a method not every backend has: Unimplemented where it is
    missing (retryable: the next target is asked)."""

    async def call(b: Backend, name: str):
        bound = getattr(b, method, None)
        if bound is None:
            raise Unimplemented(f"{b.name}: {doing} is not supported")
        return await bound(dataclasses.replace(req, model=name))

    return call
