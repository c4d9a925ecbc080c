"""What the MLX engine reports about its memory (``MLXBackend.memory_snapshot``),
read by whoever shows it (the service's metrics, at scrape time).  A module
of its own so readers need not import the engine, nor the engine them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class MemorySnapshot:
    active_bytes: int = 0
    peak_bytes: int = 0
    cache_bytes: int = 0
    kv_cache_bytes: int = 0
    prompt_cache_bytes: int = 0
    active_sequences: int = 0
    #: model name -> resident bytes of its weights
    model_bytes: dict[str, int] = field(default_factory=dict)
    #: model name -> unix time it expires; None = kept loaded
    model_expiry: dict[str, Optional[float]] = field(default_factory=dict)
