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
#: Chunk (tokens per sequence) used before any prefill has been timed.
FIRST_CHUNK = 32
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


class PrefillPacer:
    def __init__(self, max_chunk: int, interleave: float) -> None:
        self.max_chunk = max(1, max_chunk)
        self.interleave = interleave
        #: Seconds of a call that only decoded (running average).
        self.step_s: Optional[float] = None
        #: Prompt tokens per second of prefill work (running average).
        self.rate: Optional[float] = None
        #: Calls that carried a chunk since the decode step was last timed.
        self.since_step = 0

    def chunk(self, decoding: bool, prompts: Sequence[int]) -> int:
        """Prompt tokens per sequence for the next call (0: decode only).

        ``decoding``: sequences are generating (their pace is to be kept);
        ``prompts``: the uncached prompt length of each sequence the next
        call prefills (its whole prompt, not what is left of it, so the end
        of a long prompt is paced like the rest).
        """
        if self.interleave <= 0 or not decoding or not prompts:
            return self.max_chunk
        if max(prompts) <= SHORT_PROMPT and sum(prompts) <= SHORT_BURST:
            return self.max_chunk
        prefilling = len(prompts)
        if self.step_s is None or self.since_step >= SAMPLE_EVERY:
            return 0  # decode only: time the step first
        if self.rate is None:
            return min(self.max_chunk, FIRST_CHUNK)
        tokens = max(MIN_TOKENS, self.interleave * self.step_s * self.rate)
        return max(1, min(self.max_chunk, int(tokens / prefilling)))

    def observe(self, seconds: float, decoded: bool, prompt_tokens: int, joined: bool) -> None:
        """Account for one ``next()`` call: its wall time, whether it ran a
        decode step, the prompt tokens it processed, and whether sequences
        moved from prefill to decoding in it (an extra forward pass)."""
        if seconds <= 0:
            return
        if prompt_tokens == 0:
            if decoded and not joined:
                self.step_s = _avg(self.step_s, seconds, ALPHA_STEP)
                self.since_step = 0
            return
        self.since_step += 1
        if joined:
            return  # an extra forward pass of unknown cost: not a clean sample
        work = seconds - (self.step_s or 0.0) if decoded else seconds
        # Timing noise can make the difference tiny or negative: bound it.
        work = max(work, 0.25 * seconds)
        self.rate = _avg(self.rate, prompt_tokens / work, ALPHA_RATE)


def _avg(old: Optional[float], new: float, alpha: float) -> float:
    return new if old is None else old + alpha * (new - old)
