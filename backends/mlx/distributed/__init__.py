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

One concern a module: ``channel.py`` (the group and the broadcast),
``shards.py`` (what every rank loads and samples alike), ``leader.py``
(rank 0), ``follower.py`` (the other ranks), ``liveness.py`` (the heartbeat
and the watchdog).
"""

from __future__ import annotations

from backends.mlx.distributed.channel import group
from backends.mlx.distributed.follower import run_follower
from backends.mlx.distributed.leader import leader_parts
from backends.mlx.distributed.liveness import Watchdog

__all__ = ["Watchdog", "group", "leader_parts", "run_follower"]
