"""Samplers and logits processors.

Requests reach the engine already checked against the contract (ranges,
counts: ``backends/accept.py``, once, at the service boundary); the MLX
backend checks only what is specific to it (a model's context, its tool-call
format, images).  Samplers and processors create MLX arrays, so
``make_sampler``/``make_processors`` are only called on the MLX thread.

Every sampled request gets its own PRNG key (from its seed, or from
os.urandom), split once per step.  mlx-lm's default samplers draw from the
global RNG, which every sequence in a batch shares: a seed there would depend
on what else is running.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from backends.types import Sampling

#: Used when the request leaves temperature unset (Ollama's default).
DEFAULT_TEMPERATURE = 0.8
#: Tokens the repetition penalties look back over when repeat_last_n is unset (Ollama's default).
DEFAULT_REPEAT_LAST_N = 64


def new_seed(seed: Optional[int]) -> int:
    """The request's seed folded into 64 bits, or a fresh random one."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    return seed & 0xFFFF_FFFF_FFFF_FFFF


def make_sampler(s: Sampling, seed: int) -> Callable:
    """A per-sequence sampler: filters, then a draw from this sequence's own key (MLX thread only)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    temp = DEFAULT_TEMPERATURE if s.temperature is None else float(s.temperature)
    top_p = s.top_p if s.top_p is not None else 1.0
    if temp == 0 or top_p == 0:
        # top_p 0 keeps only the most likely token (OpenAI's and Ollama's reading): greedy.
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    top_k = s.top_k or 0
    min_p = s.min_p or 0.0
    typical_p = s.typical_p if s.typical_p is not None else 1.0
    state = {"key": mx.random.key(seed)}

    def sampler(logprobs):
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p)
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        if typical_p < 1:
            logprobs = apply_typical_p(logprobs, typical_p)
        key, sub = mx.random.split(state["key"])
        state["key"] = key
        return mx.random.categorical(logprobs * (1.0 / temp), key=sub)

    return sampler


def apply_typical_p(logprobs, typical_p: float):
    """Locally typical sampling (Meister et al. 2022; llama.cpp's and Ollama's
    ``typical_p``): keep the tokens whose surprise (-log p) is closest to the
    entropy, most typical first, until they hold ``typical_p`` of the
    probability; the rest get -inf.  mlx-lm has no such filter."""
    import mlx.core as mx

    probs = mx.exp(logprobs)
    entropy = -mx.sum(mx.where(probs > 0, probs * logprobs, 0.0), axis=-1, keepdims=True)
    order = mx.argsort(mx.abs(-logprobs - entropy), axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    # A token stays while the more typical ones before it hold less than typical_p (the first always stays).
    keep_sorted = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) < typical_p
    keep = mx.take_along_axis(keep_sorted, mx.argsort(order, axis=-1), axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def make_processors(s: Sampling, num_ctx: int) -> list[Callable]:
    """Repetition, presence and frequency penalties (MLX thread only)."""
    from mlx_lm.sample_utils import make_logits_processors

    last_n = DEFAULT_REPEAT_LAST_N if s.repeat_last_n is None else s.repeat_last_n
    if last_n == -1:
        last_n = num_ctx
    if last_n == 0:
        return []
    return make_logits_processors(
        repetition_penalty=s.repeat_penalty if s.repeat_penalty not in (None, 1.0) else None,
        repetition_context_size=last_n,
        presence_penalty=s.presence_penalty or None,
        presence_context_size=last_n,
        frequency_penalty=s.frequency_penalty or None,
        frequency_context_size=last_n,
    )
