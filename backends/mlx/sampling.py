"""Request validation, samplers and logits processors.

Validation is pure Python and runs on the caller's thread, so a bad parameter
fails fast with a message naming it.  Samplers and processors create MLX
arrays, so ``make_sampler``/``make_processors`` are only called on the MLX
thread.

Every sampled request gets its own PRNG key (from its seed, or from
os.urandom), split once per step.  mlx-lm's default samplers draw from the
global RNG, which every sequence in a batch shares: a seed there would depend
on what else is running.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

from backends.errors import InvalidArgument
from backends.types import GenerateRequest, Sampling

#: Used when the request leaves temperature unset (Ollama's default).
DEFAULT_TEMPERATURE = 0.8
#: Tokens the repetition penalties look back over when repeat_last_n is unset (Ollama's default).
DEFAULT_REPEAT_LAST_N = 64
MAX_TOP_LOGPROBS = 20


def _finite(name: str, value: Optional[float]) -> None:
    if value is not None and (not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value)):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}")


def validate_request(req: GenerateRequest) -> None:
    """Raise InvalidArgument naming the first bad parameter."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidArgument("exactly one of prompt and messages must be given")
    s = req.sampling
    for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
        _finite(name, getattr(s, name))
    if s.temperature is not None and s.temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0, got {s.temperature}")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {s.top_p}")
    if s.top_k is not None and s.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0, got {s.top_k}")
    if s.min_p is not None and not 0 <= s.min_p <= 1:
        raise InvalidArgument(f"min_p must be in [0, 1], got {s.min_p}")
    if s.repeat_penalty is not None and s.repeat_penalty <= 0:
        raise InvalidArgument(f"repeat_penalty must be > 0, got {s.repeat_penalty}")
    if s.repeat_last_n is not None and s.repeat_last_n < -1:
        raise InvalidArgument(f"repeat_last_n must be >= -1, got {s.repeat_last_n}")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(s, name)
        if v is not None and not -2 <= v <= 2:
            raise InvalidArgument(f"{name} must be in [-2, 2], got {v}")
    if s.num_ctx is not None and s.num_ctx <= 0:
        raise InvalidArgument(f"num_ctx must be > 0, got {s.num_ctx}")
    if any(not isinstance(x, str) for x in s.stop):
        raise InvalidArgument("stop: every stop sequence must be a string")
    if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs}")
    if req.format.kind == "json_schema" and not isinstance(req.format.schema, dict):
        raise InvalidArgument("format: json_schema needs a schema object")
    if req.keep_alive is not None:
        _finite("keep_alive", req.keep_alive)


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
    if temp == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    top_p = s.top_p if s.top_p is not None else 1.0
    top_k = s.top_k or 0
    min_p = s.min_p or 0.0
    state = {"key": mx.random.key(seed)}

    def sampler(logprobs):
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p)
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        key, sub = mx.random.split(state["key"])
        state["key"] = key
        return mx.random.categorical(logprobs * (1.0 / temp), key=sub)

    return sampler


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
