"""One model over several processes (machines), on MLX's own distributed engine.

Started with ``mlx.launch`` (ring over TCP, or JACCL over Thunderbolt 5), every
process runs ``mlxgate service --distributed``; ``mx.distributed.init()``
gives each its rank.  Every rank loads its shard of the model with mlx-lm's
``sharded_load`` (tensor parallelism: ``model.shard(group)``; with
``--pipeline``, pipeline parallelism for the models that support it), and
every forward pass is a collective: all ranks must run the same
``BatchGenerator`` operations, in the same order, with the same inputs.

- **Rank 0** is the ordinary service (gRPC, health, metrics, the MLX engine
  of ``engine.py``), with two subclasses from here: :class:`LeaderManager`
  loads shards, :class:`LeaderEngine` hands the engine a
  :class:`MirroredGenerator` instead of mlx-lm's ``BatchGenerator``.  The
  mirror records every operation on the batch (insert with the prompt, the
  sampling parameters, the seed, max tokens and output grammar; remove, for a finished,
  stopped or cancelled sequence; close) and sends the recorded ones, with
  the step's prefill chunk size, just before each ``next()``: one broadcast
  per engine step, then the step itself.  Loads, unloads and embeddings are
  sent at once.
- **Other ranks** run :func:`run_follower`: no server at all, a loop that
  receives each message and applies it to its own generator.  uids are
  assigned by each generator in insertion order, so they agree (checked).
- **The broadcast** is mlx_lm.server's: rank 0 ``all_sum``s a uint8 buffer
  holding the message, the others add zeros.  One collective of
  ``HEADER_BYTES`` per message, a second for what does not fit.  Messages
  are JSON (never pickle: a follower runs no code it receives).
- **Sampling** is deterministic across ranks: the logits are the result of
  the same collectives on every rank (identical bits), greedy takes their
  argmax, and a sampled sequence's sampler is built on every rank from the
  same parameters and **the seed rank 0 drew** (``sampling.make_sampler``:
  one PRNG key per sequence), so every rank draws the same token.  Each
  ``next`` message carries a digest of the tokens rank 0 got from the
  previous step; a follower whose own differ stops (with a log line) rather
  than carry on with a different KV cache.
- **Liveness** (:class:`Watchdog`, :class:`HeartbeatClient`): a TCP side
  channel, outside MLX.  Each follower connects to rank 0 and sends a line
  every ``HEARTBEAT_S`` (its batch size, largest batch, steps, shard bytes,
  and a secret rank 0 sent over the ring); rank 0 answers each.  A
  connection that closes (the process died) or a rank silent for
  ``MLXConfig.distributed_timeout`` seconds (the machine vanished: a
  collective would hang) takes the engine out of service: one ERROR log line, the
  requests in flight end with UNAVAILABLE, new ones are refused, and the
  ``on_broken`` callback (the composition root) turns gRPC health
  NOT_SERVING, so a front's router falls back.  A follower that loses rank 0
  exits.  A collective with a dead peer (the process exited) fails at once
  with "[ring] connection to a peer was lost"; the engine's usual error path
  then fails that step's sequences.

Output constraints (JSON formats, forced tool calls) travel as their
grammar: every rank compiles the same matcher and masks its logits alike.
Prompt-cache reuse is off (each rank would need the same store); one model
is resident at a time (``max_loaded_models`` 1).  See README, "One model
across several Macs".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Optional

from backends.errors import Unavailable
from backends.mlx.constrain import TokenizerCache
from backends.mlx.engine import Engine, Sequence, _greedy
from backends.mlx.model_manager import LoadedModel, ModelManager
from backends.mlx.registry import ModelEntry, ModelRegistry
from backends.mlx import sampling as sampling_mod
from backends.types import Sampling
from mlxgate.config import MLXConfig

log = logging.getLogger(__name__)

#: Bytes of the first collective of every message (most fit in it).
HEADER_BYTES = 512
#: A follower's heartbeat period (the silence after which a rank is dead is
#: ``MLXConfig.distributed_timeout``, sent to the followers in the hello).
HEARTBEAT_S = 0.5
#: How long rank 0 waits for every follower's first heartbeat at start-up.
CONNECT_TIMEOUT_S = 60.0

_GROUP = None


def group():
    """This process's group (``mx.distributed.init``, once)."""
    global _GROUP
    if _GROUP is None:
        import mlx.core as mx

        _GROUP = mx.distributed.init()
    return _GROUP


# ---------------------------------------------------------------- the broadcast


class Channel:
    """Rank 0 sends JSON messages to every other rank through ``all_sum``."""

    def __init__(self, grp) -> None:
        self.group = grp
        self.rank = grp.rank()
        #: The generators' stream.  Their last step left the next forward pass
        #: (and its collectives) running asynchronously there: a message's
        #: collective must not be paired with one of those on another rank,
        #: so each message first waits for that stream.
        self.stream = None

    def _all_sum(self, buf):
        import mlx.core as mx

        out = mx.distributed.all_sum(buf, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return out

    def send(self, message: Any) -> None:
        import mlx.core as mx
        import numpy as np

        data = json.dumps(message, separators=(",", ":")).encode()
        if self.stream is not None:
            mx.synchronize(self.stream)
        n = len(data)
        head = np.zeros(HEADER_BYTES, dtype=np.uint8)
        head[:4] = np.frombuffer(n.to_bytes(4, "little"), dtype=np.uint8)
        first = data[: HEADER_BYTES - 4]
        head[4 : 4 + len(first)] = np.frombuffer(first, dtype=np.uint8)
        self._all_sum(mx.array(head))
        if n > len(first):
            self._all_sum(mx.array(np.frombuffer(data[len(first) :], dtype=np.uint8)))

    def receive(self) -> Any:
        import mlx.core as mx
        import numpy as np

        if self.stream is not None:
            mx.synchronize(self.stream)
        head = np.array(self._all_sum(mx.zeros(HEADER_BYTES, dtype=mx.uint8)), copy=False)
        n = int.from_bytes(head[:4].tobytes(), "little")
        data = head[4 : 4 + min(n, HEADER_BYTES - 4)].tobytes()
        if n > len(data):
            rest = self._all_sum(mx.zeros(n - len(data), dtype=mx.uint8))
            data += np.array(rest, copy=False).tobytes()
        return json.loads(data)


def tokens_digest(responses) -> int:
    """What a step produced, as one number every rank can compare."""
    return hash(tuple((r.uid, r.token) for r in responses)) & 0xFFFF_FFFF


def _sampling_of(d: dict) -> Sampling:
    return Sampling(**d)


def sampler_for(sampling: Sampling, seed: int, guard_of: Any) -> Callable:
    """The sampler the engine gives a sequence (``Engine._admit``), on any rank."""
    if sampling.temperature == 0:
        return _greedy
    return Engine._guard(guard_of, sampling_mod.make_sampler(sampling, seed), True)


def parameter_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def load_shard(path: str, pipeline: bool):
    """This rank's shard of the model at ``path`` (every rank calls it together)."""
    from mlx_lm.utils import sharded_load

    grp = group()
    if pipeline:
        return sharded_load(path, pipeline_group=grp, tensor_group=None)
    return sharded_load(path, pipeline_group=None, tensor_group=grp)


def check_shardable(path: str, pipeline: bool) -> None:
    """Refuse, on rank 0 alone and before any rank starts loading, a model
    that cannot be split the asked way (the same check ``sharded_load`` makes
    on every rank, which would otherwise fail there one by one)."""
    from pathlib import Path

    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path), lazy=True, strict=False)
    if pipeline:
        if not (hasattr(model, "model") and hasattr(model.model, "pipeline")):
            raise Unavailable(f"{Path(path).name}: this model type does not support pipeline parallelism "
                              "(run without --pipeline: tensor parallelism)")
        if not (Path(path) / "model.safetensors.index.json").exists():
            raise Unavailable(f"{Path(path).name}: pipeline loading needs model.safetensors.index.json")
    elif not hasattr(model, "shard"):
        raise Unavailable(f"{Path(path).name}: this model type does not support tensor parallelism "
                          "(try --pipeline)")


# ---------------------------------------------------------------- rank 0


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
    config = dataclasses.replace(config, prompt_cache_bytes=0, max_loaded_models=1)
    cluster = Cluster(config)
    if cluster.size < 2:
        raise RuntimeError("--distributed needs at least 2 processes: start them with mlx.launch "
                           "(e.g. mlx.launch -n 2 --backend ring -- -m mlxgate_cli service --distributed)")
    manager = LeaderManager(config, registry, cluster)
    engine = LeaderEngine(config, manager, cluster)
    return manager, engine, cluster


# ---------------------------------------------------------------- liveness


def _leader_host() -> str:
    """Rank 0's address as the other ranks reach it: the ring's hostfile, or
    JACCL's coordinator; loopback when all ranks share one machine."""
    path = os.environ.get("MLX_HOSTFILE")
    if path:
        try:
            with open(path) as f:
                hosts = json.load(f)
            return str(hosts[0][0]).rsplit(":", 1)[0]
        except (OSError, ValueError, IndexError, TypeError):
            pass
    coord = os.environ.get("MLX_JACCL_COORDINATOR")
    if coord:
        return coord.rsplit(":", 1)[0]
    return "127.0.0.1"


class Watchdog:
    """Rank 0's end of the heartbeat channel."""

    def __init__(self, size: int, on_dead: Callable[[str], None], timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        self._on_dead = on_dead
        self._lock = threading.Lock()
        self._seen: dict[int, float] = {}
        self._stats: dict[int, dict] = {}
        self._closed: set[int] = set()
        self._stop = threading.Event()
        self._sock: Optional[socket.socket] = None
        self._started = 0.0
        #: Sent to the ranks over the ring (never on the heartbeat's TCP port):
        #: a line without it is not a rank's, and is ignored.
        self.secret = secrets.token_hex(16)
        #: Rank 0's own figures, set by whoever knows them (the backend).
        self.local: Callable[[], dict] = dict

    def start(self) -> tuple[str, int]:
        host = _leader_host()
        self._sock = socket.create_server((host, 0))
        self._started = time.monotonic()
        threading.Thread(target=self._accept, name="mlx-dist-accept", daemon=True).start()
        threading.Thread(target=self._watch, name="mlx-dist-watchdog", daemon=True).start()
        return host, self._sock.getsockname()[1]

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="mlx-dist-heartbeat", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        rank = None
        with conn, conn.makefile("rb") as lines:
            try:
                for line in lines:
                    beat = json.loads(line)
                    if not secrets.compare_digest(str(beat.pop("secret", "")), self.secret):
                        log.warning("distributed MLX watchdog: a heartbeat without the ranks' secret; "
                                    "connection closed")
                        break
                    rank = int(beat["rank"])
                    with self._lock:
                        self._seen[rank] = time.monotonic()
                        self._stats[rank] = beat
                    conn.sendall(b"ok\n")
            except (OSError, ValueError, KeyError):
                pass
        if rank is not None and not self._stop.is_set():
            with self._lock:
                self._closed.add(rank)

    def _watch(self) -> None:
        woke, skipped = time.monotonic(), False
        while not self._stop.wait(HEARTBEAT_S / 2):
            now, last = time.monotonic(), woke
            woke = now
            if now - last > HEARTBEAT_S * 2 and not skipped:
                # This process was not scheduled for a while (a loaded
                # machine): the beats may be waiting unread; judge next turn.
                skipped = True
                continue
            skipped = False
            with self._lock:
                seen, closed = dict(self._seen), set(self._closed)
            for rank in range(1, self.size):
                if rank in closed:
                    self._on_dead(f"rank {rank} closed its heartbeat connection (its process exited)")
                    return
                if rank in seen and now - seen[rank] > self.timeout:
                    self._on_dead(f"rank {rank} sent no heartbeat for {now - seen[rank]:.1f} s")
                    return
                if rank not in seen and now - self._started > CONNECT_TIMEOUT_S:
                    self._on_dead(f"rank {rank} never connected its heartbeat in {CONNECT_TIMEOUT_S:.0f} s")
                    return

    def status(self) -> list[dict]:
        now = time.monotonic()
        out = [{"rank": 0, "up": True, **self.local()}]
        with self._lock:
            for rank in range(1, self.size):
                beat = self._stats.get(rank, {})
                up = (rank in self._seen and rank not in self._closed
                      and now - self._seen[rank] <= self.timeout)
                out.append({"up": up, **beat, "rank": rank})
        return out


class HeartbeatClient:
    """A follower's end: a line every HEARTBEAT_S; rank 0 gone → this process exits."""

    def __init__(self, rank: int, host: str, port: int, stats: Callable[[], dict], timeout: float,
                 secret: str) -> None:
        self.rank = rank
        self._secret = secret
        self._stats = stats
        self.timeout = timeout
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._last_ok = time.monotonic()
        threading.Thread(target=self._send, name="mlx-dist-heartbeat", daemon=True).start()
        threading.Thread(target=self._read, name="mlx-dist-heartbeat-read", daemon=True).start()

    def _send(self) -> None:
        while True:
            try:
                beat = {**self._stats(), "rank": self.rank, "secret": self._secret}
                self._sock.sendall(json.dumps(beat).encode() + b"\n")
            except OSError as e:
                _leader_lost(f"cannot reach rank 0's watchdog: {e}")
            if time.monotonic() - self._last_ok > self.timeout:
                _leader_lost(f"rank 0 did not answer for {self.timeout:.1f} s")
            time.sleep(HEARTBEAT_S)

    def _read(self) -> None:
        try:
            with self._sock.makefile("rb") as lines:
                while True:
                    try:
                        line = lines.readline()
                    except socket.timeout:
                        continue
                    if not line:
                        break
                    self._last_ok = time.monotonic()
        except OSError:
            pass
        _leader_lost("rank 0 closed the heartbeat connection")


def _leader_lost(why: str) -> None:
    log.error("distributed MLX follower: %s; exiting", why)
    logging.shutdown()
    os._exit(1)


# ---------------------------------------------------------------- ranks > 0


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
            _leader_lost(f"could not load {name}: {type(e).__name__}: {e}")
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
        s = _sampling_of(sampling)
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
            _leader_lost(f"batch out of step: rank 0 inserted uid {uid}, this rank {mine}")
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
            _leader_lost(f"tokens differ from rank 0's (digest {digest} != {m.digest}): "
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
