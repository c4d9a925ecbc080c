"""What the engine knows of one generation request, and the counters it keeps.

Written by the engine thread (``engine.py``) only; read by the backend, the
distributed leader and the tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from backends.mlx.delivery import EventQueue
from backends.mlx.model_manager import LoadedModel
from backends.mlx.output import SequenceOutput
from backends.types import Sampling


@dataclass(eq=False)
class Sequence:
    """One generation request as the engine sees it."""

    lm: LoadedModel
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int
    num_ctx: int
    output: SequenceOutput
    #: Where the caller's Chunks, Done or exception go (see ``Engine._emit``).
    events: EventQueue
    keep_alive: Optional[float] = None
    request_id: str = ""
    logprobs: bool = False
    top_logprobs: int = 0
    matcher: Any = None
    #: The grammar ``matcher`` was compiled from.
    grammar: Optional[str] = None
    load_duration_ns: int = 0
    #: A prompt with images (``vision.prompt.VisionIds``: pixels, cache key); None otherwise.
    vision: Any = None
    t_start_ns: int = field(default_factory=time.perf_counter_ns)
    t_submit_ns: int = 0
    cancelled: bool = False
    # Engine-thread state.
    uid: Optional[int] = None
    #: Prompt processing has started / ended (the sequence is generating).
    prefilled: bool = False
    decoding: bool = False
    #: Prompt tokens (beyond the cached ones) processed so far.
    prefill_done: int = 0
    #: Prompt tokens served from the model's prompt-cache store.
    cached_tokens: int = 0
    #: Prompt tokens evaluated with the images, before the sequence joined the batch.
    vision_tokens: int = 0
    #: While its images are prefilled (``vision.prefill.ImagePrefill``); None otherwise.
    image_prefill: Any = None
    t_admit_ns: int = 0
    t_first_ns: int = 0
    error: Optional[BaseException] = None


@dataclass
class EngineStats:
    """Counters a test (or a metrics exporter) can read; written by the engine thread only."""

    decode_steps: int = 0
    #: Decode steps that advanced more than one sequence at once.
    multi_seq_steps: int = 0
    max_batch_seen: int = 0
    #: Sequences whose prompt processing started.
    prefills: int = 0
    #: Steps that processed prompt tokens, and those tokens (cached ones not counted).
    prefill_calls: int = 0
    prefill_tokens: int = 0
    #: Steps that ran the decode step and a prefill chunk as one pass (``mixed.py``).
    fused_steps: int = 0
    generated_tokens: int = 0
    failed_steps: int = 0
    #: Sequences that started from a stored prompt cache, and the prompt tokens it saved.
    prompt_cache_hits: int = 0
    cached_prompt_tokens: int = 0
    #: Finished sequences whose KV cache went into a store.
    prompt_cache_stores: int = 0
