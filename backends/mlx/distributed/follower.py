"""A rank > 0: no server, a loop applying rank 0's messages to its own shard."""

from __future__ import annotations

import dataclasses
import logging
import time
from types import SimpleNamespace
from typing import Any, Callable, Optional

from backends.mlx import joining, sampling as sampling_mod
from backends.mlx.constrain import TokenizerCache
from backends.mlx.distributed.channel import Channel, group, tokens_digest
from backends.mlx.distributed.liveness import HeartbeatClient, leader_lost
from backends.mlx.distributed.shards import load_shard, parameter_bytes, sampler_for, sampling_of
from backends.mlx.engine import Engine
from backends.mlx.registry import ModelRegistry
from mlxgate.config import MLXConfig

log = logging.getLogger("backends.mlx.distributed")


@dataclasses.dataclass
class _Model:
    model: Any
    tokenizer: Any
    parameter_bytes: int = 0
    gen: Any = None
    lltok: TokenizerCache = dataclasses.field(default_factory=TokenizerCache)
    #: Digest of the tokens of this rank's last step (see ``tokens_digest``).
    digest: int = 0
    #: uids in this rank's batch (queued, prefilling or decoding).
    uids: set = dataclasses.field(default_factory=set)


class Follower:
    """A rank > 0: applies rank 0's messages to its own shard and batch."""

    def __init__(self, config: MLXConfig, prepare: Callable[[], None] = lambda: None) -> None:
        import mlx.core as mx

        self.config = config
        #: Run at rank 0's hello, before the registry is read: writes the
        #: generated test model when there is no model (after rank 0 did, so
        #: ranks sharing a machine do not write it at once).
        self._prepare = prepare
        self.group = group()
        self.rank = self.group.rank()
        self.channel = Channel(self.group)
        self.registry: Optional[ModelRegistry] = None
        self.models: dict[str, _Model] = {}
        self.stream = mx.new_stream(mx.default_device())
        self.channel.stream = self.stream
        self.pipeline = False
        self.steps = 0
        self.max_batch = 0
        self.heartbeat: Optional[HeartbeatClient] = None

    def stats(self) -> dict:
        """What the heartbeat carries (its thread: plain Python values only, no MLX)."""
        try:
            models = list(self.models.items())
            return {
                "sequences": sum(len(m.uids) for _, m in models),
                "max_batch": self.max_batch,
                "steps": self.steps,
                "parameter_bytes": sum(m.parameter_bytes for _, m in models),
                "models": sorted(name for name, _ in models),
            }
        except RuntimeError:  # changed while read: the next beat has it
            return {}

    def run(self) -> int:
        while True:
            for op in self.channel.receive():
                kind = op[0]
                if kind == "stop":
                    log.info("distributed MLX follower %d: rank 0 stopped; exiting", self.rank)
                    return 0
                getattr(self, f"_op_{kind}")(*op[1:])

    def _op_hello(self, host: str, port: int, pipeline: bool, timeout: float, secret: str) -> None:
        self.pipeline = pipeline
        self._prepare()
        self.registry = ModelRegistry(self.config)
        self.heartbeat = HeartbeatClient(self.rank, host, port, self.stats, timeout, secret)
        log.info("distributed MLX follower: rank %d of %d (%s parallelism), heartbeat to %s:%d",
                 self.rank, self.group.size(), "pipeline" if pipeline else "tensor", host, port)

    def _op_load(self, name: str) -> None:
        try:
            entry = self.registry.resolve(name)
            t0 = time.perf_counter()
            model, tokenizer = load_shard(str(entry.path), self.pipeline)
        except Exception as e:  # noqa: BLE001 - rank 0 waits in the load: leaving is the way to tell it
            leader_lost(f"could not load {name}: {type(e).__name__}: {e}")
        self.models[name] = _Model(model, tokenizer, parameter_bytes(model))
        log.info("distributed MLX follower %d: loaded its shard of %s (%.1f MB) in %.2fs", self.rank, name,
                 self.models[name].parameter_bytes / 1e6, time.perf_counter() - t0)

    def _op_unload(self, name: str) -> None:
        import gc

        import mlx.core as mx

        m = self.models.pop(name, None)
        if m is not None and m.gen is not None:
            m.gen.close()
        del m
        gc.collect()
        mx.clear_cache()
        log.info("distributed MLX follower %d: unloaded %s", self.rank, name)

    def _op_gen(self, name: str, params: dict) -> None:
        from mlx_lm.generate import BatchGenerator

        m = self.models[name]
        m.gen = BatchGenerator(m.model, stream=self.stream, **params)
        joining.install(m.gen)  # as the leader's (engine.py), so both ranks join alike
        m.uids.clear()
        m.digest = 0

    def _op_close(self, name: str) -> None:
        m = self.models.get(name)
        if m is not None and m.gen is not None:
            m.gen.close()
            m.gen = None
            m.uids.clear()

    def _op_insert(self, name: str, uid: int, prompt: list, max_tokens: int, sampling: dict, seed: int,
                   num_ctx: int, grammar: Optional[list]) -> None:
        m = self.models[name]
        s = sampling_of(sampling)
        guard = SimpleNamespace(error=None)
        sampler = sampler_for(s, seed, guard)
        procs = sampling_mod.make_processors(s, num_ctx)
        if grammar is not None:
            # As Engine.processors_for: the constraint last, so it wins.
            from backends.mlx.constrain import GrammarProcessor, new_matcher

            text, vocab_size, eos = grammar
            lltok = m.lltok.get(m.tokenizer._tokenizer, vocab_size, eos)
            procs.append(GrammarProcessor(new_matcher(lltok, text), len(prompt), vocab_size))
        procs = [Engine._guard(guard, p, False) for p in procs]
        (mine,) = m.gen.insert([prompt], max_tokens=[max_tokens], caches=[None], all_tokens=[[]],
                               samplers=[sampler], logits_processors=[procs])
        if mine != uid:
            leader_lost(f"batch out of step: rank 0 inserted uid {uid}, this rank {mine}")
        m.uids.add(uid)
        log.debug("follower %d: +%d, batch %d", self.rank, uid, len(m.uids))

    def _op_remove(self, name: str, uids: list) -> None:
        m = self.models[name]
        m.gen.remove(uids)
        m.uids.difference_update(uids)
        log.debug("follower %d: -%s, batch %d", self.rank, uids, len(m.uids))

    def _op_next(self, name: str, prefill_step_size: int, digest: int) -> None:
        m = self.models[name]
        if digest != m.digest:
            leader_lost(f"tokens differ from rank 0's (digest {digest} != {m.digest}): "
                         "the ranks' batches diverged")
        m.gen.prefill_step_size = prefill_step_size
        _, gen_resps = m.gen.next()
        m.digest = tokens_digest(gen_resps)
        if gen_resps:
            self.steps += 1
            self.max_batch = max(self.max_batch, len(gen_resps))
        for r in gen_resps:
            if r.finish_reason is not None:
                m.uids.discard(r.uid)

    def _op_embed(self, name: str, ids: list, dimensions: int) -> None:
        from backends.mlx.embed import embed_one

        embed_one(self.models[name].model, ids, dimensions)


def run_follower(config: MLXConfig, prepare: Callable[[], None] = lambda: None) -> int:
    """A rank > 0 of ``mlxgate service --distributed``: no server, the follower loop."""
    follower = Follower(config, prepare)
    log.info("distributed MLX follower %d of %d started; waiting for rank 0", follower.rank,
             follower.group.size())
    try:
        return follower.run()
    except KeyboardInterrupt:  # Ctrl-C on mlx.launch reaches every local rank
        return 130
    except Exception as e:  # noqa: BLE001 - a lost peer, a divergence: rank 0's watchdog sees this exit
        log.error("distributed MLX follower %d: %s: %s; exiting", follower.rank, type(e).__name__, e,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
