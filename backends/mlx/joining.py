"""A finished prefill joins the running batch without a pass of its own and with one copy.

When sequences in mlx-lm's ``BatchGenerator`` finish their prompt, the
generator splits them off its prompt batch (``PromptProcessingBatch.split``),
turns them into a generation batch (``generate``) and extends the running
batch with it.  Two of those steps cost a stall of every running stream, paid
in the step where the sequence joins, on top of that step's decode:

- ``split`` deep-copies the whole prompt batch's KV cache and then drops from
  each copy the rows it does not keep: for a long prompt prefilled alone (the
  usual case while others stream) a full copy of its cache, every layer.
  :meth:`PromptBatch.split` hands the caches over as they are when every
  sequence in prefill finishes together (a split that keeps some in prefill
  is mlx-lm's).
- ``generate`` runs a forward pass of the newcomers alone, on their last
  prompt token, to sample their first token: reading every weight once more
  for one row.  :meth:`PromptBatch.generate` instead makes that last prompt
  token the newcomers' next input, so it rides in the batch's next decode
  step as one more row.  That step returns it as if it had been generated
  (mlx-lm returns a step's inputs); :func:`is_echo` tells the engine which
  response that is, to drop it.  The sequence's token count starts one lower
  and its stop matcher skips that token, so ``max_tokens`` and stop tokens
  count only what it generates.
- ``BatchKVCache.extend`` pads both sides to one length and concatenates
  them (the bytes of the joined cache, twice) and is left lazy, so the next
  step pays it together with its first pass over the larger batch.
  :class:`JoiningKVCache` (the class the batch's plain caches get at the
  join) writes each side once into one buffer, :func:`settle` builds it in
  the join step, and its ``filter`` (a removal) gathers only the window the
  kept rows use.

:class:`PromptBatch` also takes a chunk already prefilled by a fused step
(``mixed.py``): its ``prompt`` then only records the tokens.

:func:`install` puts one into a new ``BatchGenerator`` (its prompt batch only
ever grows by ``extend``, so it keeps this class).  Built on mlx-lm's
``PromptProcessingBatch`` and ``GenerationBatch`` internals (0.32).
MLX thread only.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
from mlx_lm.generate import GenerationBatch, PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache, TokenBuffer


class _SkipOne:
    """A stop matcher that does not see the first token (the echoed prompt token)."""

    def __init__(self, matcher: Any) -> None:
        self.matcher, self.skip = matcher, True

    def advance(self, token: int) -> bool:
        if self.skip:
            self.skip = False
            return False
        return self.matcher.advance(token)


class JoiningKVCache(BatchKVCache):
    """mlx-lm's ``BatchKVCache`` whose ``extend`` (a join) writes each side
    once into one new buffer.  mlx-lm's pads both sides to a common length
    (a copy of each) and concatenates them (a copy of both): twice the bytes
    of the joined cache, in the step where a sequence joins."""

    def extend(self, other: Any) -> None:
        if self.keys is None or other.keys is None or type(other) not in (BatchKVCache, JoiningKVCache):
            return super().extend(other)
        idx = max(self._idx, other._idx)
        size = max(self.keys.shape[2], other.keys.shape[2], idx)
        rows = self.keys.shape[0]
        keys = mx.zeros((rows + other.keys.shape[0], self.keys.shape[1], size, self.keys.shape[3]), self.keys.dtype)
        values = mx.zeros((keys.shape[0], self.values.shape[1], size, self.values.shape[3]), self.values.dtype)
        for part, c in ((slice(0, rows), self), (slice(rows, None), other)):
            keys[part, :, idx - c._idx : idx, :] = c.keys[..., : c._idx, :]
            values[part, :, idx - c._idx : idx, :] = c.values[..., : c._idx, :]
        self.left_padding = mx.concatenate(
            [self.left_padding + (idx - self._idx), other.left_padding + (idx - other._idx)]
        )
        self.offset = mx.concatenate([self.offset, other.offset])
        self.keys, self.values, self._idx = keys, values, idx

    def filter(self, batch_indices: list[int]) -> None:
        """Keep these rows (a removal): one gather of the window they use.

        mlx-lm's copies every kept row at the buffer's full length, then drops
        the padding they no longer need: when a long row leaves short ones,
        a copy of the long row's length for every row."""
        if self.keys is None or not len(batch_indices):
            return super().filter(batch_indices)
        rows = mx.array(batch_indices)
        left = self.left_padding[rows]
        trim = min(left.tolist())
        self.keys = self.keys[rows, :, trim:, :]
        self.values = self.values[rows, :, trim:, :]
        self.offset = self.offset[rows]
        self.left_padding = left - trim
        self._idx -= trim


def _joining(caches: list) -> list:
    """The batch's plain layer caches as :class:`JoiningKVCache` (same state, new class)."""
    for c in caches:
        if type(c) is BatchKVCache:
            c.__class__ = JoiningKVCache
    return caches


class PromptBatch(PromptProcessingBatch):
    #: The fused step (``mixed._FusedModel``) that prefilled this call's chunk, if any.
    done_chunk: Any = None
    #: uids whose next response echoes their last prompt token (see :func:`is_echo`);
    #: one set, shared by the batches split off this one.
    echoes: set

    def _copy(self) -> "PromptBatch":
        new = super()._copy()
        new.echoes, new.done_chunk = self.echoes, None
        return new

    def split(self, indices: list[int]) -> PromptProcessingBatch:
        if sorted(indices) != list(range(len(self.uids))):
            return super().split(indices)
        moved = self.__class__.__new__(self.__class__)
        moved.__dict__.update(self.__dict__)
        # What filter([]) leaves: no sequences, no caches (new lists: ``moved`` owns the old ones).
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens, self.stop_sequences = [], [], [], []
        return moved

    def prompt(self, tokens: list[list[int]]) -> None:
        done = self.done_chunk
        if done is not None and done.used:
            if tokens != [done.chunk]:
                raise RuntimeError("a fused step prefilled a chunk this batch did not take")
            # The fused pass prefilled it: record the tokens, finish the pass.
            self.tokens[0] += done.chunk
            mx.eval([c.state for c in self.prompt_cache])
            return
        super().prompt(tokens)

    def generate(self, tokens: list[list[int]]) -> GenerationBatch:
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        n = len(self.uids)
        batch = GenerationBatch.__new__(GenerationBatch)
        batch.model = self.model
        batch.uids, batch.prompt_cache, batch.tokens = self.uids, _joining(self.prompt_cache), self.tokens
        batch.samplers, batch.fallback_sampler = self.samplers, self.fallback_sampler
        batch.logits_processors, batch.stop_sequences = self.logits_processors, self.stop_sequences
        batch.max_tokens = self.max_tokens
        batch._current_tokens, batch._current_logprobs = None, []
        # The last prompt token is the next input; its "logprobs" are never read.
        batch._next_tokens = mx.array([t[-1] for t in tokens], dtype=mx.uint32)
        batch._next_logprobs = [mx.array(0.0)] * n
        batch._token_context = [TokenBuffer(t) for t in self.tokens]
        batch._num_tokens = [-1] * n  # the echo is not generated
        batch._matchers = [_SkipOne(s.matcher()) for s in self.stop_sequences]
        self.echoes.update(self.uids)
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens = [], [], []
        return batch


def settle(gen: Any) -> None:
    """After a join: build the joined batch's caches now, in the join step.

    The join leaves them lazy, so they would be built in the next step,
    before its forward pass: one step would pay the copy and the first pass
    over the larger batch together (on the bench model, about 4x a running
    stream's usual gap).  Built here, the join step pays the copy beside its
    own decode step and the next pays its pass: each well under that."""
    batch = getattr(gen, "_generation_batch", None)
    if batch is not None and batch.prompt_cache:
        mx.eval(batch._next_tokens, [c.state for c in batch.prompt_cache])


def is_echo(gen: Any, uid: int) -> bool:
    """Whether this response of ``uid`` is its last prompt token coming back
    (its first decode step): true once per joined sequence."""
    echoes: Optional[set] = getattr(gen, "echoes", None)
    if echoes is None or uid not in echoes:
        return False
    echoes.discard(uid)
    return True


def forget(gen: Any, uids: list[int]) -> None:
    """Sequences left the batch before their echo came back."""
    echoes: Optional[set] = getattr(gen, "echoes", None)
    if echoes:
        echoes.difference_update(uids)


def install(gen: Any) -> None:
    """Give a new ``BatchGenerator`` a :class:`PromptBatch` (before anything is inserted)."""
    old = gen._prompt_batch
    if len(old):
        raise RuntimeError("install() is for a generator with nothing in prefill")
    batch = PromptBatch.empty(old.model, old.fallback_sampler, prefill_step_size=old.prefill_step_size)
    # The engine asks the generator (``is_echo``); the batches record into it.
    gen.echoes = batch.echoes = set()
    gen._prompt_batch = batch
