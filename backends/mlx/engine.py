"""The one thread that owns MLX, and the continuous-batching loop it runs.

MLX arrays, streams and compiled functions are not meant to be shared across
threads, and a model must never be used by two threads at once.  So every MLX
call (loading, prefill, decode, embeddings, unloading) happens here, and the
event loop talks to this thread through a command queue; results go back per
request through its ``EventQueue`` (``delivery.py``): appended without a
wake-up, and each event loop woken once per turn of the engine's loop for all
the requests it serves.

Each loaded model has an mlx-lm ``BatchGenerator``: sequences join it as they
arrive (up to ``max_batch_size``) and leave it when they finish or are
cancelled, between two decode steps.  A sequence's sampler and processors run
inside the batched step; they are wrapped so an exception in one sequence's
code fails that sequence only.  An exception in the batched forward pass
fails the sequences of that model (their callers get ``Unavailable`` and can
fall back); the thread and other models carry on.

Prompt-cache reuse (``prompt_cache.py``): a sequence that ends normally
leaves its KV cache in its model's store; a new sequence starts from a copy
of the stored cache sharing the longest prefix with its prompt, so only the
rest of the prompt is evaluated (``Done.cached_prompt_tokens`` counts the
tokens served from the store).

KV-cache quantization (``kv_quant.py``, ``MLXConfig.kv_bits``): a model
loaded with it gets a plan of the layers to quantize, and each sequence
enters the batch with its cache in ``kv_quant``'s classes, so the batch
keeps those layers' caches quantized (the store then holds them so too).

Prefill is interleaved with decoding (``pacing.py``): while sequences are
generating, each step processes only as much of a new prompt as fits in
about ``MLXConfig.prefill_interleave`` decode steps, so a long prompt does
not stop the running streams for the length of its prefill.  A prompt with
images is prefilled the same way before it joins the batch (``_advance_images``:
its image part in chunks the same pacer sizes, in the same steps).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Callable, Optional

from backends.errors import BackendError, Unavailable
from backends.types import Done, TokenLogprob, TopLogprob
from backends.mlx import joining, mixed
from backends.mlx.delivery import Dispatcher
from backends.mlx.model_manager import LoadedModel, ModelManager
from backends.mlx.pacing import PrefillPacer
from backends.mlx.prompt_cache import enforce_budget
from backends.mlx.sequence import EngineStats, Sequence
from backends.mlx.registry import BACKEND
from backends.mlx import sampling as sampling_mod
from backends.mlx.vision import mrope, prefill as vision_prefill
from mlxgate.config import MLXConfig

log = logging.getLogger(__name__)

_WAKE = object()
_STOP = object()
#: Logprob reported for tokens a constraint made impossible (OpenAI uses the same floor).
_LOGPROB_FLOOR = -9999.0


def _greedy(logprobs):
    """The sampler of every greedy sequence (it cannot fail, so it needs no guard)."""
    import mlx.core as mx

    return mx.argmax(logprobs, axis=-1)


class Engine:
    def __init__(self, config: MLXConfig, manager: ModelManager) -> None:
        self._config = config
        self._manager = manager
        self._cmds: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight: set[Sequence] = set()
        self._stream = None
        self._closed = False
        self._dispatch = Dispatcher()
        self.stats = EngineStats()
        #: (active, peak, cache, kv-cache, prompt-cache) bytes, refreshed by the
        #: MLX thread so a metrics scrape never calls into MLX from another thread.
        #: kv-cache: caches of sequences in flight; prompt-cache: the stores.
        self.memory: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._memory_at = 0.0
        #: Optional object with ``observe_queue_wait(model, seconds)`` (the service metrics).
        self.observer: Any = None
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- any thread

    @property
    def active_count(self) -> int:
        """Sequences in flight: queued, in prefill or decoding."""
        with self._lock:
            return len(self._inflight)

    def call(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the MLX thread; the future carries its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed:
            fut.set_exception(Unavailable("MLX engine is shut down"))
            return fut
        self._cmds.put((fn, args, fut))
        return fut

    def submit(self, seq: Sequence) -> None:
        seq.t_submit_ns = time.perf_counter_ns()
        with self._lock:
            self._inflight.add(seq)
        fut = self.call(self._add, seq)
        if fut.done() and fut.exception() is not None:
            with self._lock:
                self._inflight.discard(seq)
            seq.events.put(fut.exception())  # the caller reads its queue before waiting

    def cancel(self, seq: Sequence) -> None:
        """Called when the caller went away: the sequence leaves the batch at the next step."""
        if not seq.cancelled:
            seq.cancelled = True
            self._cmds.put(_WAKE)

    def stop(self, timeout: float = 30.0) -> None:
        if not self._closed:
            self._closed = True
            self._cmds.put(_STOP)
        self._thread.join(timeout)

    # ---------------------------------------------------------------- MLX thread

    def _run(self) -> None:
        import mlx.core as mx

        # Streams belong to the thread that creates them.
        self._stream = mx.new_stream(mx.default_device())
        while True:
            busy = any(lm.active or lm.pending or lm.staging for lm in self._manager.loaded())
            try:
                cmd = self._cmds.get_nowait() if busy else self._cmds.get(timeout=self._idle_timeout())
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd is _STOP:
                    self._shutdown()
                    return
                if cmd is not _WAKE:
                    self._run_command(*cmd)
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
            try:
                self._drop_cancelled()
                for lm in self._manager.loaded():
                    self._admit(lm)
                    if lm.active or lm.staging:
                        self._step(lm)
                        self._dispatch.flush()
                self._manager.expire()
                if time.monotonic() - self._memory_at > 0.25:
                    self._refresh_memory()
                self._end_of_turn()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("MLX engine loop error")
            finally:
                self._dispatch.flush()

    def _end_of_turn(self) -> None:
        """After each turn of the loop (``distributed/leader.py`` sends what is left to send)."""

    def _emit(self, seq: Sequence, event: Any) -> None:
        """Queue an event for the caller; its loop is woken by the next ``flush``."""
        self._dispatch.put(seq, event)

    def _refresh_memory(self) -> None:
        import mlx.core as mx

        kv = stored = 0
        for lm in self._manager.loaded():
            if lm.generator is not None:
                kv += lm.generator.prompt_cache_nbytes
            if lm.prompt_cache is not None:
                stored += lm.prompt_cache.nbytes
        self.memory = (mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory(), kv, stored)
        self._memory_at = time.monotonic()

    def _idle_timeout(self) -> float:
        deadline = self._manager.next_deadline()
        if deadline is None:
            return 1.0
        return min(1.0, max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _run_command(fn: Callable, args: tuple, fut: concurrent.futures.Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)

    def _add(self, seq: Sequence) -> None:
        if seq.cancelled:
            self._retire(seq)
        else:
            seq.lm.pending.append(seq)

    def _new_generator(self, lm: LoadedModel):
        from mlx_lm.generate import BatchGenerator

        size = max(1, self._config.max_batch_size)
        gen = BatchGenerator(
            lm.model,
            stop_tokens=[[t] for t in sorted(lm.eos_token_ids)],
            completion_batch_size=size,
            prefill_batch_size=min(8, size),
            prefill_step_size=self._config.prefill_step_size,
            stream=self._stream,
        )
        joining.install(gen)
        return gen

    def processors_for(self, seq: Sequence) -> list[Callable]:
        """Logits processors of one sequence: penalties, then the output constraint (last, so it wins)."""
        procs = sampling_mod.make_processors(seq.sampling, seq.num_ctx)
        if seq.matcher is not None:
            from backends.mlx.constrain import GrammarProcessor

            procs.append(GrammarProcessor(seq.matcher, len(seq.prompt_ids), seq.lm.vocab_size))
        return procs

    @staticmethod
    def _guard(seq: Sequence, fn: Callable, is_sampler: bool) -> Callable:
        """Contain one sequence's failure to that sequence."""

        def guarded(*args):
            if seq.error is None:
                try:
                    return fn(*args)
                except Exception as e:  # noqa: BLE001 - recorded, the step goes on
                    seq.error = e
            if is_sampler:
                import mlx.core as mx

                return mx.argmax(args[0], axis=-1)
            return args[-1]

        return guarded

    def _admit(self, lm: LoadedModel) -> None:
        limit = max(1, self._config.max_batch_size)
        while lm.pending and len(lm.active) + len(lm.staging) < limit:
            seq = lm.pending.pop(0)
            if seq.cancelled:
                self._retire(seq)
                continue
            try:
                if lm.generator is None:
                    lm.generator = self._new_generator(lm)
                seq.t_admit_ns = time.perf_counter_ns()
                key = seq.prompt_ids if seq.vision is None else seq.vision.key
                cache, n = lm.prompt_cache.fetch(key) if lm.prompt_cache is not None else (None, 0)
                if lm.vision is not None and lm.vision.mrope:
                    # Its rope delta rides in its cache (vision/mrope.py).
                    cache = mrope.place(lm.model, lm.vision, seq.vision, cache)
                if n:
                    seq.cached_tokens = n
                    self.stats.prompt_cache_hits += 1
                    self.stats.cached_prompt_tokens += n
                if seq.vision is not None and vision_prefill.needed(seq.vision, n):
                    # The vision tower now; the image part a chunk per step (_advance_images).
                    seq.image_prefill = vision_prefill.begin(lm.model, lm.vision, seq.vision, cache, n)
                    lm.staging.append(seq)
                    continue
                self._join(lm, seq, n, cache)
                del cache
            except Exception as e:  # noqa: BLE001
                self._fail(seq, e)

    def _join(self, lm: LoadedModel, seq: Sequence, n: int, cache: Any) -> None:
        """Put an admitted sequence into its model's batch, its first ``n``
        prompt tokens in ``cache``."""
        if seq.sampling.temperature == 0:
            # One object for every greedy sequence: a batch of them is
            # sampled with one argmax instead of one per row.
            sampler = _greedy
        else:
            sampler = self._guard(seq, sampling_mod.make_sampler(seq.sampling, seq.seed), True)
        procs = [self._guard(seq, p, False) for p in self.processors_for(seq)]
        uid = self._insert(lm, seq, n, cache, sampler, procs)
        seq.uid = uid
        lm.active[uid] = seq

    def _advance_images(self, lm: LoadedModel, chunk: int, count: int) -> int:
        """Evaluate ``chunk`` more image-prompt tokens of each of the first
        ``count`` staged sequences; those done join the batch.  The tokens evaluated."""
        tokens = 0
        for seq in lm.staging[:count]:
            ip = seq.image_prefill
            try:
                if not ip.done and chunk > 0:
                    if not seq.prefilled:
                        seq.prefilled = True
                        self.stats.prefills += 1
                        self._observe_queue_wait(seq)
                    tokens += ip.advance(lm.model, chunk)
                if ip.done:
                    lm.staging.remove(seq)
                    seq.image_prefill = None
                    seq.vision_tokens = ip.pos - ip.start
                    self._join(lm, seq, ip.pos, ip.cache)
            except Exception as e:  # noqa: BLE001 - that sequence fails, the others go on
                if seq in lm.staging:
                    lm.staging.remove(seq)
                seq.image_prefill = None
                self._fail(seq, e)
        return tokens

    def _insert(self, lm: LoadedModel, seq: Sequence, n: int, cache: Any, sampler: Callable, procs: list) -> int:
        """Put ``seq`` into its model's batch, its first ``n`` prompt tokens
        served from ``cache``; its uid in the batch."""
        if lm.kv_layers is not None:
            from backends.mlx import kv_quant

            cache = kv_quant.adopt(lm.model, lm.kv_layers, cache)
        (uid,) = lm.generator.insert(
            [seq.prompt_ids[n:]],
            max_tokens=[seq.max_tokens],
            # The batch appends to all_tokens: always a fresh list.
            caches=[cache],
            all_tokens=[seq.prompt_ids[:n]],
            samplers=[sampler],
            logits_processors=[procs],
        )
        return uid

    def embed_one(self, lm: LoadedModel, ids: list[int], dimensions: int) -> list[float]:
        """One embedding vector (MLX thread: run it with ``call``)."""
        from backends.mlx.embed import embed_one

        return embed_one(lm.model, ids, dimensions)

    def _step(self, lm: LoadedModel) -> None:
        if lm.generator is None:  # a failed step dropped it while images were being prefilled
            lm.generator = self._new_generator(lm)
        gen = lm.generator
        decoding = 0
        # Uncached prompt lengths of the sequences the next call prefills
        # (BatchGenerator takes them in arrival order, prefill_batch_size at a time).
        prompts: list[int] = []
        for s in lm.active.values():
            if s.decoding:
                decoding += 1
            elif len(prompts) < gen.prefill_batch_size:
                prompts.append(len(s.prompt_ids) - s.cached_tokens - s.vision_tokens)
        # Images being prefilled are paced with the batch's prompts, in the same call.
        staged = min(len(lm.staging), gen.prefill_batch_size)
        prompts += [s.image_prefill.total for s in lm.staging[:staged]]
        if lm.pacer is None:
            lm.pacer = PrefillPacer(self._config.prefill_step_size, self._config.prefill_interleave)
        if prompts:
            gen.prefill_step_size = lm.pacer.chunk(decoding > 0, prompts)
        t0 = time.perf_counter()
        try:
            # (a chunk of 0: the pacer times a decode step, nothing is prefilled)
            image_tokens = self._advance_images(lm, gen.prefill_step_size, staged) if staged else 0
            with mixed.fused_step(gen, lm.fused) as fused:
                prompt_resps, gen_resps = gen.next() if lm.active else ([], [])
            if fused is not None and fused.used:
                self.stats.fused_steps += 1
            if any(r.end_of_prompt for r in prompt_resps):
                joining.settle(gen)
        except Exception as e:  # noqa: BLE001 - the whole batch of this model is lost
            log.exception("MLX step failed for %s", lm.name)
            self.stats.failed_steps += 1
            lm.generator = None
            for seq in list(lm.active.values()):
                self._fail(seq, e)
            try:
                gen.close()
            except Exception:  # noqa: BLE001
                pass
            return
        elapsed = time.perf_counter() - t0
        prompt_tokens, joined = image_tokens, False
        for r in prompt_resps:
            seq = lm.active.get(r.uid)
            if seq is None:
                continue
            prompt_tokens += max(0, r.progress[0] - seq.prefill_done)
            seq.prefill_done = r.progress[0]
            if not seq.prefilled:
                seq.prefilled = True
                self.stats.prefills += 1
                self._observe_queue_wait(seq)
            if r.end_of_prompt:
                seq.decoding = joined = True
        if prompt_tokens:
            self.stats.prefill_calls += 1
            self.stats.prefill_tokens += prompt_tokens
        lm.pacer.observe(elapsed, decoding > 0, prompt_tokens, joined)
        if gen_resps:
            self.stats.decode_steps += 1
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(gen_resps))
            if len(gen_resps) > 1:
                self.stats.multi_seq_steps += 1
        now = time.perf_counter_ns()
        for r in gen_resps:
            if joining.is_echo(gen, r.uid):
                continue  # a newcomer's last prompt token, through its first decode step
            self.stats.generated_tokens += 1
            seq = lm.active.get(r.uid)
            if seq is None or seq.cancelled or seq.error is not None:
                continue
            if not seq.t_first_ns:
                seq.t_first_ns = now
            try:
                lp = self._logprob(seq, r.token, r.logprobs) if seq.logprobs else None
                chunks, stop = seq.output.add(r.token, lp)
            except Exception as e:  # noqa: BLE001
                seq.error = e
                continue
            for c in chunks:
                self._emit(seq, c)
            if stop or r.finish_reason:
                if r.finish_reason is None:
                    kept = gen.remove([r.uid], return_prompt_caches=lm.prompt_cache is not None)
                    cache, tokens = kept.get(r.uid, (None, None))
                else:
                    cache, tokens = r.prompt_cache, r.all_tokens
                # Stored before Done goes out: the caller's next turn finds it.
                self._keep_cache(lm, self._cache_key(seq, tokens), cache)
                self._finish(seq, "stop" if stop else r.finish_reason)
        for seq in [s for s in lm.active.values() if s.error is not None]:
            gen.remove([seq.uid])
            joining.forget(gen, [seq.uid])
            self._fail(seq, seq.error)

    @staticmethod
    def _cache_key(seq: Sequence, tokens: Optional[list[int]]) -> Optional[list[int]]:
        """What the store files a finished sequence's cache under: its tokens,
        image tokens keyed by the images' content (``vision/prompt.py``)."""
        if seq.vision is None or not tokens:
            return tokens
        return list(seq.vision.key) + list(tokens[len(seq.prompt_ids):])

    def _keep_cache(self, lm: LoadedModel, tokens: Optional[list[int]], cache: Optional[list]) -> None:
        """Put a finished sequence's KV cache (holding ``tokens``) into its model's store."""
        store = lm.prompt_cache
        if store is None or not tokens or not cache:
            return  # reuse off (or the model is gone)
        try:
            if store.insert(tokens, cache):
                self.stats.prompt_cache_stores += 1
                stores = [m.prompt_cache for m in self._manager.loaded() if m.prompt_cache is not None]
                enforce_budget(stores, self._config.prompt_cache_bytes)
                self._memory_at = 0.0  # the stores changed: refresh the figures this turn
        except Exception:  # noqa: BLE001 - a lost cache only costs a prefill
            log.exception("could not keep the prompt cache of a %s sequence", lm.name)

    def _observe_queue_wait(self, seq: Sequence) -> None:
        if self.observer is None:
            return
        try:
            self.observer.observe_queue_wait(seq.lm.name, (time.perf_counter_ns() - seq.t_submit_ns) / 1e9)
        except Exception:  # noqa: BLE001 - metrics must never break generation
            log.exception("queue-wait observer failed")

    def _logprob(self, seq: Sequence, token: int, vec) -> TokenLogprob:
        import mlx.core as mx

        decode = seq.lm.tokenizer.decode
        top = []
        k = seq.top_logprobs
        if k:
            idx = mx.argpartition(-vec, kth=k - 1)[:k]
            pairs = sorted(zip(idx.tolist(), vec[idx].tolist()), key=lambda p: -p[1])
            top = [TopLogprob(i, decode([i]), max(v, _LOGPROB_FLOOR)) for i, v in pairs]
        return TokenLogprob(token, decode([token]), max(vec[token].item(), _LOGPROB_FLOOR), top)

    def _drop_cancelled(self) -> None:
        for lm in self._manager.loaded():
            for uid, seq in list(lm.active.items()):
                if seq.cancelled:
                    if lm.generator is not None:
                        lm.generator.remove([uid])
                        joining.forget(lm.generator, [uid])
                    self._retire(seq)
            for seq in [s for s in lm.pending if s.cancelled]:
                lm.pending.remove(seq)
                self._retire(seq)
            for seq in [s for s in lm.staging if s.cancelled]:
                lm.staging.remove(seq)
                seq.image_prefill = None
                self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        """The sequence is over: out of the batch, out of the in-flight set, model pin released."""
        if seq.uid is not None:
            seq.lm.active.pop(seq.uid, None)
        with self._lock:
            if seq not in self._inflight:
                return
            self._inflight.discard(seq)
        self._manager.release(seq.lm, seq.keep_alive)

    def _finish(self, seq: Sequence, reason: str) -> None:
        for c in seq.output.finish():
            self._emit(seq, c)
        if reason == "stop" and seq.output.tool_calls_emitted:
            reason = "tool_calls"
        now = time.perf_counter_ns()
        first = seq.t_first_ns or now
        done = Done(
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=seq.output.completion_tokens,
            cached_prompt_tokens=seq.cached_tokens,
            load_duration_ns=seq.load_duration_ns,
            prompt_eval_duration_ns=max(0, first - (seq.t_admit_ns or first)),
            eval_duration_ns=max(0, now - first),
            total_duration_ns=now - seq.t_start_ns,
            backend=BACKEND,
            model=seq.lm.name,
            stop_sequence=seq.output.stop_sequence if reason == "stop" else "",
        )
        # Release first, so a keep_alive=0 model is gone when the caller sees Done.
        self._retire(seq)
        self._emit(seq, done)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self._retire(seq)
        if isinstance(exc, BackendError):
            self._emit(seq, exc)
        else:
            self._emit(seq, Unavailable(f"MLX generation failed for {seq.lm.name}: {type(exc).__name__}: {exc}"))

    def _shutdown(self) -> None:
        with self._lock:
            seqs = list(self._inflight)
        for seq in seqs:
            self._fail(seq, Unavailable("MLX engine is shutting down"))
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, tuple) and cmd[2].set_running_or_notify_cancel():
                cmd[2].set_exception(Unavailable("MLX engine is shut down"))
        self._dispatch.flush()
        self._manager.unload_all()
