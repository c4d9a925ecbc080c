"""Rank 0: the engine whose batch operations every other rank repeats."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable, Optional

from backends.errors import Unavailable
from backends.mlx.distributed.channel import Channel, group, tokens_digest
from backends.mlx.distributed.liveness import Watchdog
from backends.mlx.distributed.shards import check_shardable, load_shard
from backends.mlx.engine import Engine, Sequence
from backends.mlx.model_manager import LoadedModel, ModelManager
from backends.mlx.registry import ModelEntry, ModelRegistry
from backends.types import Sampling
from mlxgate.config import MLXConfig

log = logging.getLogger("backends.mlx.distributed")


class Cluster:
    """Rank 0's side: the channel, the queue of batch operations, the watchdog."""

    def __init__(self, config: MLXConfig) -> None:
        self.group = group()
        self.size = self.group.size()
        self.channel = Channel(self.group)
        self.pipeline = config.pipeline
        self._ops: list = []
        self.broken: Optional[str] = None
        self._broke_lock = threading.Lock()
        self.timeout = config.distributed_timeout
        self.watchdog = Watchdog(self.size, self._broke, self.timeout)
        #: Called once, from the watchdog's thread, with the reason (the
        #: composition root turns health NOT_SERVING).
        self.on_broken: list[Callable[[str], None]] = []
        #: Also called when the engine goes out of service (the engine fails its requests).
        self._engine_broken: Optional[Callable[[str], None]] = None

    # -- the protocol (MLX thread)

    @property
    def pending(self) -> bool:
        return bool(self._ops)

    def queue(self, op: list) -> None:
        self._ops.append(op)

    def flush(self, op: Optional[list] = None) -> None:
        """Send the queued operations (and ``op``) as one message."""
        if op is not None:
            self._ops.append(op)
        ops, self._ops = self._ops, []
        if self.broken is not None:
            raise Unavailable(f"distributed MLX engine out of service: {self.broken}")
        self.channel.send(ops)

    def hello(self) -> None:
        """The first message: where the watchdog listens."""
        host, port = self.watchdog.start()
        self.channel.send([["hello", host, port, self.pipeline, self.timeout, self.watchdog.secret]])
        log.info("distributed MLX engine: rank 0 of %d (%s parallelism); watchdog on %s:%d",
                 self.size, "pipeline" if self.pipeline else "tensor", host, port)

    # -- health

    def _broke(self, reason: str) -> None:
        with self._broke_lock:  # the watchdog's thread, or the MLX thread (a failed load)
            if self.broken is not None:
                return
            self.broken = reason
        log.error("distributed MLX engine out of service: %s; requests in flight end with UNAVAILABLE, "
                  "health is NOT_SERVING (restart every rank with mlx.launch)", reason)
        if self._engine_broken is not None:
            self._engine_broken(reason)
        for cb in list(self.on_broken):
            try:
                cb(reason)
            except Exception:  # noqa: BLE001
                log.exception("on_broken callback failed")

    def status(self) -> list[dict]:
        """Per rank: up, sequences in its batch, largest batch, steps, shard bytes."""
        return self.watchdog.status()


class MirroredGenerator:
    """A ``BatchGenerator`` on rank 0 whose every operation the other ranks repeat."""

    def __init__(self, cluster: Cluster, name: str, gen: Any, params: dict) -> None:
        self._cluster = cluster
        self._name = name
        self._gen = gen
        #: ``joining.is_echo`` reads it (every rank's batch echoes alike).
        self.echoes = gen.echoes
        self._last_digest = 0
        cluster.queue(["gen", name, params])

    # What the engine reads.
    @property
    def prefill_batch_size(self) -> int:
        return self._gen.prefill_batch_size

    @property
    def prompt_cache_nbytes(self) -> int:
        return self._gen.prompt_cache_nbytes

    @property
    def prefill_step_size(self) -> int:
        return self._gen.prefill_step_size

    @prefill_step_size.setter
    def prefill_step_size(self, value: int) -> None:
        self._gen.prefill_step_size = value

    def insert_one(self, prompt: list[int], max_tokens: int, sampling: Sampling, seed: int, num_ctx: int,
                   sampler: Callable, procs: list, grammar: Optional[list] = None) -> int:
        (uid,) = self._gen.insert(
            [prompt], max_tokens=[max_tokens], caches=[None], all_tokens=[[]],
            samplers=[sampler], logits_processors=[procs],
        )
        self._cluster.queue(["insert", self._name, uid, prompt, max_tokens, dataclasses.asdict(sampling),
                             seed, num_ctx, grammar])
        return uid

    def remove(self, uids, return_prompt_caches: bool = False):
        self._cluster.queue(["remove", self._name, list(uids)])
        return self._gen.remove(uids, return_prompt_caches=return_prompt_caches)

    def next(self):
        self._cluster.flush(["next", self._name, self._gen.prefill_step_size, self._last_digest])
        prompt_resps, gen_resps = self._gen.next()
        self._last_digest = tokens_digest(gen_resps)
        return prompt_resps, gen_resps

    def close(self) -> None:
        self._cluster.queue(["close", self._name])
        self._gen.close()


class LeaderManager(ModelManager):
    """Loads this rank's shard, and has the other ranks load theirs."""

    def __init__(self, config: MLXConfig, registry: ModelRegistry, cluster: Cluster) -> None:
        super().__init__(config, registry)
        self._cluster = cluster

    def _load_files(self, entry: ModelEntry):
        check_shardable(str(entry.path), self._cluster.pipeline)
        self._cluster.flush(["load", entry.name])
        try:
            return load_shard(str(entry.path), self._cluster.pipeline)
        except Exception as e:
            # The other ranks may be past their load (or dead): their state is unknown.
            self._cluster._broke(f"loading {entry.name} failed on rank 0: {type(e).__name__}: {e}")
            raise

    def _fused(self, model: Any, vision: Any) -> bool:
        # A fused pass changes the shapes that travel between the ranks' shards.
        return False

    def _load_vision(self, entry: ModelEntry, config: dict):
        raise Unavailable(f"{entry.name} is a vision-language model: a distributed engine serves text models only")

    def unload(self, lm: LoadedModel) -> None:
        was = lm.loaded
        super().unload(lm)
        if was and not lm.loaded and self._cluster.broken is None:
            self._cluster.flush(["unload", lm.name])


class LeaderEngine(Engine):
    """The engine of ``engine.py`` with its batch operations mirrored on every rank."""

    def __init__(self, config: MLXConfig, manager: ModelManager, cluster: Cluster) -> None:
        self.cluster = cluster
        cluster._engine_broken = self._broken
        super().__init__(config, manager)
        self.call(self._hello).add_done_callback(_log_failure)

    def _hello(self) -> None:
        self.cluster.channel.stream = self._stream
        self.cluster.hello()

    def submit(self, seq: Sequence) -> None:
        if self.cluster.broken is not None:
            seq.events.put(Unavailable(f"distributed MLX engine out of service: {self.cluster.broken}"))
            return
        super().submit(seq)

    def _new_generator(self, lm: LoadedModel):
        gen = super()._new_generator(lm)
        params = {
            "stop_tokens": [[t] for t in sorted(lm.eos_token_ids)],
            "completion_batch_size": gen.completion_batch_size,
            "prefill_batch_size": gen.prefill_batch_size,
            "prefill_step_size": gen.prefill_step_size,
        }
        return MirroredGenerator(self.cluster, lm.name, gen, params)

    def _insert(self, lm: LoadedModel, seq: Sequence, n: int, cache: Any, sampler: Callable, procs: list) -> int:
        grammar = None
        if seq.matcher is not None:
            # The other ranks compile the same grammar: their logits must be masked alike.
            grammar = [seq.grammar, lm.vocab_size, sorted(lm.eos_token_ids)]
        return lm.generator.insert_one(seq.prompt_ids, seq.max_tokens, seq.sampling, seq.seed, seq.num_ctx,
                                       sampler, procs, grammar)

    def _end_of_turn(self) -> None:
        # Batch operations ride on the next step's message; with no next step
        # coming (the batch emptied: the last sequence finished or was
        # cancelled), send them now so the other ranks drop those sequences.
        if self.cluster.pending and self.cluster.broken is None:
            if not any(lm.active for lm in self._manager.loaded()):
                self.cluster.flush()

    def embed_one(self, lm: LoadedModel, ids: list[int], dimensions: int) -> list[float]:
        self.cluster.flush(["embed", lm.name, ids, dimensions])
        return super().embed_one(lm, ids, dimensions)

    def stop(self, timeout: float = 30.0) -> None:
        # Out of service, the MLX thread may be stuck in a collective for good.
        super().stop(2.0 if self.cluster.broken is not None else timeout)

    def _shutdown(self) -> None:
        super()._shutdown()
        if self.cluster.broken is None:
            try:
                self.cluster.flush(["stop"])
            except Exception:  # noqa: BLE001 - the others are gone already
                log.warning("could not tell the other ranks to stop", exc_info=True)
        self.cluster.watchdog.stop()

    def _broken(self, reason: str) -> None:
        """From the watchdog's thread: the MLX thread may be stuck in a
        collective for good, so end the requests in flight from here."""
        with self._lock:
            seqs = list(self._inflight)
            self._inflight.clear()
        exc = Unavailable(f"distributed MLX engine out of service: {reason}")
        for seq in seqs:
            seq.cancelled = True
            seq.events.put(exc)
            try:
                seq.events.loop.call_soon_threadsafe(seq.events.wake)
            except RuntimeError:  # that loop is closed
                pass
        self._cmds.put(object())  # wake the MLX thread if it is idle


def _log_failure(fut) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("distributed MLX engine: start-up failed: %s", fut.exception())


def leader_parts(config: MLXConfig, registry: ModelRegistry) -> tuple[LeaderManager, LeaderEngine, Cluster]:
    """Rank 0's manager, engine and cluster (``MLXBackend`` with ``config.distributed``)."""
    if config.prompt_cache_bytes:
        log.info("distributed MLX engine: prompt-cache reuse is off")
    if config.max_loaded_models != 1:
        log.info("distributed MLX engine: one model resident at a time")
    if config.kv_bits or any(t.get("kv_bits") for t in config.models.values()):
        log.info("distributed MLX engine: KV-cache quantization is off (the other ranks keep full-precision caches)")
    config = dataclasses.replace(config, prompt_cache_bytes=0, max_loaded_models=1, kv_bits=None,
                                 models={k: {**t, "kv_bits": 0} for k, t in config.models.items()})
    cluster = Cluster(config)
    if cluster.size < 2:
        raise RuntimeError("--distributed needs at least 2 processes: start them with mlx.launch "
                           "(e.g. mlx.launch -n 2 --backend ring -- -m mlxgate_cli service --distributed)")
    manager = LeaderManager(config, registry, cluster)
    engine = LeaderEngine(config, manager, cluster)
    return manager, engine, cluster
