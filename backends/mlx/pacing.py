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
configured ``prefill_step_size``.  Pure arithmetic, no MLX.
"""

from __future__ import annotations

from typing import Optional

#: Weight of a new measurement in the running averages.
ALPHA = 0.3
#: Chunk (tokens per sequence) used before any prefill has been timed.
FIRST_CHUNK = 32
#: Fewest prompt tokens one call processes (all sequences in prefill together):
#: below this a forward pass costs little less than a decode step and the
#: prompt would take far too long.
MIN_TOKENS = 16


class PrefillPacer:
    def __init__(self, max_chunk: int, interleave: float) -> None:
        self.max_chunk = max(1, max_chunk)
        self.interleave = interleave
        #: Seconds of a call that only decoded (running average).
        self.step_s: Optional[float] = None
        #: Prompt tokens per second of prefill work (running average).
        self.rate: Optional[float] = None

    def chunk(self, decoding: bool, prefilling: int) -> int:
        """Prompt tokens per sequence for the next call.

        ``decoding``: sequences are generating (their pace is to be kept);
        ``prefilling``: sequences whose prompt is (still) being processed.
        """
        if self.interleave <= 0 or not decoding or prefilling <= 0:
            return self.max_chunk
        if self.step_s is None or self.rate is None:
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
                self.step_s = _avg(self.step_s, seconds)
            return
        if joined:
            return  # an extra forward pass of unknown cost: not a clean sample
        work = seconds - (self.step_s or 0.0) if decoded else seconds
        # Timing noise can make the difference tiny or negative: bound it.
        work = max(work, 0.25 * seconds)
        self.rate = _avg(self.rate, prompt_tokens / work)


def _avg(old: Optional[float], new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)
