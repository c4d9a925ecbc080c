"""MLXBackend: the ``backends.base.Backend`` protocol over the MLX engine.

This layer runs on the event loop and never touches MLX: it resolves names,
pins models, tokenizes in worker threads, and hands work to
the engine thread, whose results come back through per-request event queues
(``delivery.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
import weakref
from typing import Any, AsyncIterator, Iterator, Optional

from backends.errors import (
    BackendError, ModelNotFound, ResourceExhausted, TakesNoImages, Unavailable, Unimplemented,
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
from backends.types import (
    DetokenizeRequest,
    DetokenizeResult,
    RerankRequest,
    RerankResult,
    TokenizeRequest,
    TokenizeResult,
    rank,
)
from backends.mlx import embed as embed_mod, prompt as prompt_mod
from backends.mlx import plan as plan_mod, rerank as rerank_mod, tokenizing
from backends.mlx.context import TokenCounter
from backends.mlx.delivery import EventQueue, coalesce
from backends.mlx.engine import Engine, EngineStats, Sequence
from backends.mlx.memory_snapshot import MemorySnapshot
from backends.mlx.model_manager import LoadedModel, ModelManager
from backends.mlx.registry import BACKEND, ModelEntry, ModelRegistry
from backends.mlx.sampling import new_seed
from backends.mlx.vision import prompt as vision_prompt
from mlxgate.config import MLXConfig

log = logging.getLogger(__name__)

class MLXBackend:
    """Local generation and embeddings with mlx-lm; one instance per process.

    Extra read-only attributes for tests and metrics: ``active_count``,
    ``stats`` (decode steps, steps that served more than one sequence, the
    largest batch, prefills), ``load_count``.
    """

    name = BACKEND
    #: Embeddings take token ids: the models are here, with their own tokenizers.
    takes_token_ids = True
    #: An mlxgate engine: placed with the remote services by warmth and load
    #: (``backends/routing/placement.py``).
    is_engine = True

    def __init__(self, config: MLXConfig, observer: Any = None) -> None:
        """``observer``: optional object with ``observe_queue_wait(model, seconds)``
        (the service's metrics); also settable later as ``.observer``."""
        self.config = config
        self._registry = ModelRegistry(config)
        #: Rank 0's view of a distributed engine (``distributed/leader.py``); None in one process.
        self.cluster: Any = None
        if config.distributed:
            from backends.mlx.distributed import leader_parts

            self._manager, self._engine, self.cluster = leader_parts(config, self._registry)
            self.cluster.watchdog.local = self._rank0_status
        else:
            self._manager = ModelManager(config, self._registry)
            self._engine = Engine(config, self._manager)
        self._engine.observer = observer
        #: Requests accepted and not yet finished (see ``_admission``).
        self._accepted = 0
        #: Each loaded causal model's judging prompt for reranking, made on first use.
        self._judges: "weakref.WeakKeyDictionary[LoadedModel, rerank_mod.Judge]" = weakref.WeakKeyDictionary()

    # ---------------------------------------------------------------- introspection

    @property
    def registry(self) -> ModelRegistry:
        """The models on disk; ``registry.store`` holds the managed ones (pulled, created, copied)."""
        return self._registry

    @property
    def serving(self) -> bool:
        """False once a distributed engine lost a rank (the router then skips it)."""
        return self.cluster is None or self.cluster.broken is None

    @property
    def watches_health(self) -> bool:
        """Only a distributed engine has a health of its own (its ranks)."""
        return self.cluster is not None

    @property
    def not_serving_reason(self) -> str:
        if self.cluster is None or self.cluster.broken is None:
            return ""
        return f"distributed MLX engine out of service: {self.cluster.broken}"

    def _rank0_status(self) -> dict:
        loaded = self._manager.loaded()
        return {
            "sequences": self.active_count,
            "max_batch": self._engine.stats.max_batch_seen,
            "steps": self._engine.stats.decode_steps,
            "parameter_bytes": sum(lm.size_bytes for lm in loaded),
            "models": sorted(lm.name for lm in loaded),
        }

    def distributed_status(self) -> list[dict]:
        """Per rank of a distributed engine: up, sequences, largest batch, steps,
        shard bytes (rank 0's own and the others' heartbeats); [] in one process."""
        return self.cluster.status() if self.cluster is not None else []

    @property
    def active_count(self) -> int:
        return self._engine.active_count

    @property
    def accepted_count(self) -> int:
        """Requests accepted (waiting for a load, tokenizing, queued or running)."""
        return self._accepted

    @property
    def stats(self) -> EngineStats:
        return self._engine.stats

    @property
    def max_batch_seen(self) -> int:
        return self._engine.stats.max_batch_seen

    @property
    def multi_seq_steps(self) -> int:
        return self._engine.stats.multi_seq_steps

    @property
    def load_count(self) -> int:
        return self._manager.load_count

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def observer(self) -> Any:
        return self._engine.observer

    @observer.setter
    def observer(self, value: Any) -> None:
        self._engine.observer = value

    def memory_snapshot(self) -> MemorySnapshot:
        """Memory figures for the metrics collector (cheap; never calls MLX from this thread)."""
        active, peak, cache, kv, stored = self._engine.memory
        running = self._manager.running()
        return MemorySnapshot(
            active_bytes=active,
            peak_bytes=peak,
            cache_bytes=cache,
            kv_cache_bytes=kv,
            prompt_cache_bytes=stored,
            active_sequences=self.active_count,
            model_bytes={m.name: m.size_bytes for m in running},
            model_expiry={m.name: m.expires_at.timestamp() if m.expires_at else None for m in running},
        )

    # ---------------------------------------------------------------- helpers

    async def _resolve(self, name: str) -> ModelEntry:
        return await asyncio.to_thread(self._registry.resolve, name)

    def _release(self, lm: LoadedModel, keep_alive: Optional[float]) -> concurrent.futures.Future:
        return self._engine.call(self._manager.release, lm, keep_alive)

    async def _acquire(self, entry: ModelEntry, keep_alive: Optional[float]) -> tuple[LoadedModel, int]:
        """Pin the model, loading it on the MLX thread if needed; (model, load time in ns)."""
        lm = self._manager.pin_if_loaded(entry)
        if lm is not None:
            return lm, 0
        t0 = time.perf_counter_ns()
        fut = self._engine.call(self._manager.load_and_pin, entry)
        try:
            lm = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:

            def _unpin(f: concurrent.futures.Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._release(f.result(), keep_alive)

            fut.add_done_callback(_unpin)
            raise
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"failed to load model {entry.name}: {e}") from None
        self._report_loaded(lm.name)
        return lm, time.perf_counter_ns() - t0

    def _report_loaded(self, model: str) -> None:
        """Tell the observer a model is resident (its metric series start at 0)."""
        observer = self._engine.observer
        if observer is not None and hasattr(observer, "model_loaded"):
            try:
                observer.model_loaded(BACKEND, model)
            except Exception:  # noqa: BLE001 - metrics never break a request
                log.exception("model-loaded observer failed")

    # ---------------------------------------------------------------- Backend protocol

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        # The request is inside the contract (backends/accept.py, at the
        # service); what is checked here is this engine's: context, tool-call
        # format, images.
        t_start = time.perf_counter_ns()
        with self._admission():
            async with contextlib.aclosing(self._generate(req, t_start)) as events:
                async for ev in events:
                    yield ev

    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        """Count a request from the moment it is accepted — before resolving,
        loading, tokenizing and queueing — so ``max_pending`` holds even when
        a cold model keeps every request waiting for its load."""
        if self._accepted >= self.config.max_pending:
            # Ollama's OLLAMA_MAX_QUEUE: refuse at once rather than queue without
            # bound; the router can send the request to the next backend.
            raise ResourceExhausted(
                f"MLX engine busy: {self._accepted} requests pending (max_pending {self.config.max_pending})",
                retry_after=1.0,
            )
        self._accepted += 1
        try:
            yield
        finally:
            self._accepted -= 1

    async def _generate(self, req: GenerateRequest, t_start: int) -> AsyncIterator[Event]:
        if self.cluster is not None and self.cluster.broken is not None:
            raise Unavailable(f"distributed MLX engine out of service: {self.cluster.broken}")
        entry = await self._resolve(req.model)
        if vision_prompt.has_images(req) and not self._registry.takes_images(entry):
            # Before loading anything: the router may try a backend that takes images.
            raise TakesNoImages(req.model)
        lm, load_ns = await self._acquire(entry, req.keep_alive)
        pinned: Optional[LoadedModel] = lm
        seq: Optional[Sequence] = None
        try:
            plan = None if prompt_mod.is_empty(req) else await asyncio.to_thread(
                plan_mod.plan, req, lm, self.config.default_max_tokens, self._engine.observer)
            if plan is None or plan.max_tokens == 0:
                # Ollama's "just load it" request, or nothing to generate.
                pinned = None
                await asyncio.wrap_future(self._release(lm, req.keep_alive))
                yield Done(
                    finish_reason="stop" if plan is None else "length",
                    prompt_tokens=len(plan.prompt_ids) if plan else 0,
                    load_duration_ns=load_ns,
                    total_duration_ns=time.perf_counter_ns() - t_start,
                    backend=BACKEND,
                    model=lm.name,
                )
                return
            events = EventQueue(asyncio.get_running_loop())
            seq = Sequence(
                lm=lm,
                prompt_ids=plan.prompt_ids,
                max_tokens=plan.max_tokens,
                sampling=req.sampling,
                seed=new_seed(req.sampling.seed),
                num_ctx=plan.num_ctx,
                output=plan.output,
                events=events,
                keep_alive=req.keep_alive,
                request_id=req.request_id,
                logprobs=req.logprobs or req.top_logprobs > 0,
                top_logprobs=req.top_logprobs,
                matcher=plan.matcher,
                grammar=plan.grammar,
                vision=plan.vision,
                load_duration_ns=load_ns,
                t_start_ns=t_start,
            )
            pinned = None  # the sequence owns the pin now
            self._engine.submit(seq)
            while True:
                # All that is ready, consecutive chunks merged: a reader that
                # fell behind catches up in one message.
                for ev in coalesce(await events.get_all()):
                    if isinstance(ev, BaseException):
                        raise ev
                    yield ev
                    if isinstance(ev, Done):
                        return
        finally:
            if seq is not None:
                self._engine.cancel(seq)
            if pinned is not None:
                self._release(pinned, req.keep_alive)

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        entry = await self._resolve(req.model)
        lm, _ = await self._acquire(entry, req.keep_alive)
        try:
            n = 0 if prompt_mod.is_empty(req) else await asyncio.to_thread(plan_mod.count, req, lm)
        finally:
            self._release(lm, req.keep_alive)
        return TokenCount(input_tokens=n, backend=BACKEND, model=lm.name)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        t_start = time.perf_counter_ns()
        entry = await self._resolve(req.model)
        lm, load_ns = await self._acquire(entry, req.keep_alive)
        released = False
        try:
            if req.input_tokens:
                batches = await asyncio.to_thread(
                    embed_mod.token_inputs,
                    req.input_tokens,
                    _vocabulary_size(lm),
                    lm.context_length,
                    req.truncate,
                    lm.name,
                )
            else:
                if lm.counter is None:
                    lm.counter = TokenCounter(lm.tokenizer)
                batches = await asyncio.to_thread(
                    embed_mod.tokenize_inputs,
                    lm.counter,
                    lm.tokenizer,
                    list(req.inputs),
                    lm.context_length,
                    req.truncate,
                    lm.name,
                )
            vectors: list[list[float]] = []
            for ids in batches:
                fut = self._engine.call(self._engine.embed_one, lm, ids, req.dimensions)
                try:
                    vectors.append(await asyncio.wrap_future(fut))
                except asyncio.CancelledError:
                    fut.cancel()
                    raise
                except BackendError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise Unavailable(f"MLX embedding failed for {lm.name}: {type(e).__name__}: {e}") from None
            released = True
            await asyncio.wrap_future(self._release(lm, req.keep_alive))
            return EmbedResult(
                embeddings=vectors,
                prompt_tokens=sum(len(b) for b in batches),
                model=lm.name,
                backend=BACKEND,
                load_duration_ns=load_ns,
                total_duration_ns=time.perf_counter_ns() - t_start,
            )
        finally:
            if not released:
                self._release(lm, req.keep_alive)

    # ---------------------------------------------------------------- rerank, tokenize, detokenize

    async def rerank(self, req: RerankRequest) -> RerankResult:
        """Scores in batches through the engine (``rerank.py``), best first."""
        if self.cluster is not None:
            raise Unimplemented("MLX: reranking is not supported on a distributed engine")
        with self._admission():
            entry = await self._resolve(req.model)
            lm, _ = await self._acquire(entry, req.keep_alive)
            try:
                method = rerank_mod.method_of(lm.name, entry.path)
                prepared = await asyncio.to_thread(self._rerank_plan, req, lm, method)
                step = self.config.prefill_step_size
                if method == "cosine":
                    vectors = await self._batched(lm, prepared, rerank_mod.mean_embeddings, step)
                    scores = await self._on_engine(lm, rerank_mod.cosine_scores, vectors[0], vectors[1:])
                else:
                    judge = self._judges[lm]
                    prefix = await self._on_engine(lm, rerank_mod.prefill, lm.model, prepared.prefix, step)
                    if prefix is None and prepared.prefix:  # no sharing with this model's cache
                        prepared.sequences = [prepared.prefix + seq for seq in prepared.sequences]
                    scores = await self._batched(lm, prepared, rerank_mod.yes_scores, judge.yes, judge.no, step,
                                                 prefix)
            finally:
                self._release(lm, req.keep_alive)
        return RerankResult(ranked=rank(scores, req.top_n), total_tokens=prepared.total_tokens, model=lm.name,
                            backend=BACKEND, method=method)

    def _rerank_plan(self, req: RerankRequest, lm: LoadedModel, method: str) -> rerank_mod.Prepared:
        """The request's sequences within the context and the token bound (worker thread)."""
        if lm.counter is None:
            lm.counter = TokenCounter(lm.tokenizer)
        if method == "cosine":
            return rerank_mod.embedding_sequences(lm.counter, lm.tokenizer, req.query, req.documents,
                                                  lm.context_length)
        judge = self._judges.get(lm)
        if judge is None:
            judge = self._judges[lm] = rerank_mod.Judge.of(lm.tokenizer, lm.name)
        return rerank_mod.judge_sequences(judge, lm.counter, lm.tokenizer, req.query, req.documents,
                                          req.instruction, lm.context_length, lm.name)

    async def _on_engine(self, lm: LoadedModel, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the MLX thread; a failure that is not the caller's is Unavailable."""
        fut = self._engine.call(fn, *args)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"MLX reranking failed for {lm.name}: {type(e).__name__}: {e}") from None

    async def _batched(self, lm: LoadedModel, prepared: Any, fn: Any, *args: Any) -> list:
        """``fn(model, sequences, *args)`` per batch, one engine call each, results in sequence order."""
        out: list = [None] * len(prepared.sequences)
        for batch in prepared.batches:
            values = await self._on_engine(lm, fn, lm.model, [prepared.sequences[i] for i in batch], *args)
            for i, v in zip(batch, values):
                out[i] = v
        return out

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        entry = await self._resolve(req.model)
        lm, _ = await self._acquire(entry, req.keep_alive)
        try:
            if lm.counter is None:
                lm.counter = TokenCounter(lm.tokenizer)

            def work() -> TokenizeResult:
                ids = tokenizing.tokenize(req, lm.tokenizer, lm.counter, lm.context_length, lm.name)
                pieces = tokenizing.pieces(lm.tokenizer, ids) if req.return_pieces else []
                return TokenizeResult(ids, pieces, lm.context_length, lm.name, BACKEND)

            return await asyncio.to_thread(work)
        finally:
            self._release(lm, req.keep_alive)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResult:
        entry = await self._resolve(req.model)
        lm, _ = await self._acquire(entry, req.keep_alive)
        try:
            text = await asyncio.to_thread(tokenizing.detokenize, lm.tokenizer, req.tokens, _vocabulary_size(lm),
                                           lm.name)
        finally:
            self._release(lm, req.keep_alive)
        return DetokenizeResult(text, lm.name, BACKEND)

    async def list_models(self) -> list[ModelInfo]:
        def _list() -> list[ModelInfo]:
            return [self._registry.info(e) for e in self._registry.scan()]

        return await asyncio.to_thread(_list)

    async def show_model(self, name: str) -> ModelShow:
        entry = await self._resolve(name)
        return await asyncio.to_thread(self._registry.show, entry)

    async def list_running(self) -> list[RunningModel]:
        return self._manager.running()

    async def load_model(self, name: str, keep_alive: Optional[float]) -> LoadResult:
        """Load (or, with keep_alive 0, unload, as Ollama does) a model."""
        entry = await self._resolve(name)
        if keep_alive == 0:
            await asyncio.wrap_future(self._engine.call(self._manager.unload_by_name, entry))
            return LoadResult(model=entry.name, backend=BACKEND)
        lm, load_ns = await self._acquire(entry, keep_alive)
        await asyncio.wrap_future(self._release(lm, keep_alive))
        return LoadResult(model=lm.name, backend=BACKEND, load_duration_ns=load_ns)

    async def unload_model(self, name: str) -> bool:
        try:
            entry = await self._resolve(name)
        except ModelNotFound:
            return False
        return await asyncio.wrap_future(self._engine.call(self._manager.unload_by_name, entry))

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.stop)


def _vocabulary_size(lm: LoadedModel) -> int:
    """Ids a client may send: the tokenizer's, within the model's embedding rows
    (rows past the tokenizer's last id are padding, never produced by it)."""
    try:
        return min(lm.vocab_size, len(lm.tokenizer._tokenizer))
    except TypeError:  # a tokenizer without a length
        return lm.vocab_size
