"""Prefill in chunks small enough that running streams keep their pace.

mlx-lm's ``BatchGenerator.next()`` runs one decode step for the sequences
that are generating, then up to ``prefill_step_size`` prompt tokens of each
sequence still in prefill.  With a fixed step size, a long prompt arriving
while others stream stops their tokens for the time of each of its chunks
(at 512 tokens, ~30 decode steps on a CPU).

:class:`PrefillPacer` sizes the chunk before each ``next()`` from what the
engine measured: the time of a decode step, and the prefill rate.  While
sequences are decoding, a call's prefill work is held to about
``interleave`` decode steps, so the longest gap between two tokens of a
running stream is about ``1 + interleave`` times the usual one.  With
nothing decoding there is nobody to keep waiting, and the chunk is the
configured ``prefill_step_size``.

Short prompts are not paced: when every prompt in prefill has at most
``SHORT_PROMPT`` uncached tokens and they add up to at most ``SHORT_BURST``
(a chat turn, a new conversation, a burst of them arriving together), they
are prefilled at once.  Cut up, they would pay a forward pass's fixed cost
(reading all the weights, about a decode step on a CPU) per piece and join
the batch later, for little gain: their whole prefill is a few steps at
most.  What would stop running streams for long (a long document, a long
history without a cached prefix) is paced.

The decode step is timed on calls that only decode.  While a long prompt is
being prefilled every call also carries a chunk, so every few calls one is
left without (a chunk of 0): the step time stays current when the batch or
the machine's load changes, instead of sizing chunks from a stale figure.
Pure arithmetic, no MLX.
"""

from __future__ import annotations

from typing import Optional, Sequence

#: Weight of a new measurement in the running averages: a decode step timed
#: on its own is a clean sample (and a rarer one while prefilling); a
#: prefill rate is inferred, and drifts as the prompt's offset grows.
ALPHA_STEP = 0.5
ALPHA_RATE = 0.3
#: Chunk (tokens per sequence) of the first paced call, before a paced chunk
#: has been timed: about a decode step's worth on a CPU.
FIRST_CHUNK = 16
#: Fewest prompt tokens one call processes (all sequences in prefill
#: together), so a prompt always makes progress.  A chunk's forward pass has a
#: fixed cost (reading the weights, about a decode step's) besides its tokens;
#: the rate measured at the chunk sizes in use includes it, so the chunk
#: settles where its whole cost fits the budget.
MIN_TOKENS = 4
#: While prefilling beside decoding, at most this many calls carry a chunk
#: before one only decodes (and times the decode step again).
SAMPLE_EVERY = 6
#: Prompts (uncached tokens) prefilled at once even while others decode,
#: each at most SHORT_PROMPT and all of them together at most SHORT_BURST.
SHORT_PROMPT = 64
SHORT_BURST = 256
#: A paced chunk is at most this many times the previous one, so one wrong
#: estimate cannot make one step many times longer than the others.
GROWTH = 2.0


class PrefillPacer:
    def __init__(self, max_chunk: int, interleave: float) -> None:
        self.max_chunk = max(1, max_chunk)
        self.interleave = interleave
        #: Seconds of a call that only decoded (running average).
        self.step_s: Optional[float] = None
        #: Prompt tokens per second of paced prefill work (running average of
        #: calls that decoded and carried a chunk).
        self.rate: Optional[float] = None
        #: Calls that carried a chunk since the decode step was last timed.
        self.since_step = 0
        #: The last ``chunk`` was a paced one (its call times a chunk's cost),
        #: and its size (a paced chunk grows at most GROWTH times a call).
        self.paced = False
        self.last_chunk = 0
        #: The next step timing replaces the average instead of joining it
        #: (pacing starts, or the average proved stale).
        self.retime = True

    def chunk(self, decoding: bool, prompts: Sequence[int]) -> int:
        """Prompt tokens per sequence for the next call (0: decode only).

        ``decoding``: sequences are generating (their pace is to be kept);
        ``prompts``: the uncached prompt length of each sequence the next
        call prefills (its whole prompt, not what is left of it, so the end
        of a long prompt is paced like the rest).
        """
        was_paced, self.paced = self.paced, False
        if self.interleave <= 0 or not decoding or not prompts:
            return self.max_chunk
        if max(prompts) <= SHORT_PROMPT and sum(prompts) <= SHORT_BURST:
            return self.max_chunk
        if self.step_s is None or self.since_step >= SAMPLE_EVERY or not (was_paced or self.since_step == 0):
            # Decode only, to time the step: first of all, every few chunks,
            # and when pacing starts (the batch may have changed since).
            if not was_paced:
                self.retime = True
            return 0
        self.paced = True
        if self.rate is None:
            n = FIRST_CHUNK
        else:
            tokens = max(MIN_TOKENS, self.interleave * self.step_s * self.rate)
            n = max(1, int(tokens / len(prompts)))
            if self.last_chunk:
                n = min(n, max(1, int(self.last_chunk * GROWTH)))
        self.last_chunk = n = min(self.max_chunk, n)
        return n

    def observe(self, seconds: float, decoded: bool, prompt_tokens: int, joined: bool) -> None:
        """Account for one ``next()`` call: its wall time, whether it ran a
        decode step, the prompt tokens it processed, and whether sequences
        moved from prefill to decoding in it (an extra forward pass)."""
        if seconds <= 0:
            return
        if prompt_tokens == 0:
            if decoded and not joined:
                self.step_s = seconds if self.retime else _avg(self.step_s, seconds, ALPHA_STEP)
                self.since_step, self.retime = 0, False
            return
        self.since_step += 1
        if joined or not decoded or not self.paced or self.step_s is None:
            # Only a paced chunk beside a decode step says what a paced chunk
            # costs: whole prompts prefilled at once spread a forward pass's
            # fixed cost over far more tokens, and a join adds a forward pass.
            return
        work = seconds - self.step_s
        if work < 0.05 * seconds:
            # The chunk seems to have cost (next to) nothing: the step time is
            # stale (too long).  Time the step again rather than believe it.
            self.since_step, self.retime = SAMPLE_EVERY, True
            return
        self.rate = _avg(self.rate, prompt_tokens / work, ALPHA_RATE)


def _avg(old: Optional[float], new: float, alpha: float) -> float:
    return new if old is None else old + alpha * (new - old)
