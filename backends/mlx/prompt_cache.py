"""Reusable KV caches: a prompt that shares a prefix with an earlier sequence
(the next turn of a chat, a repeated system prompt) skips that part of prefill.

- **Store.**  When a sequence leaves the batch normally (EOS, length, a stop
  string), its KV cache and the tokens it holds (prompt + generated) go into
  the store of *its* model, ``LoadedModel.prompt_cache``.  One store per
  loaded model, so a different model never sees another's caches, and
  unloading a model drops its store with it.  The store is mlx-lm's own
  ``LRUPromptCache`` (``mlx_lm/models/cache.py``, the one ``mlx_lm.server``
  drives with ``BatchGenerator``): a token trie plus LRU eviction by entry
  count and bytes.  This module adds what the batch path needs around it:
  at least one prompt token left to evaluate, a byte bound shared by all
  models (``MLXConfig.prompt_cache_bytes``, enforced by :func:`enforce_budget`),
  no insertion of an entry that alone exceeds the bound, and evaluating an
  entry before storing it so it does not keep the batch's buffers alive.
- **Matching.**  ``fetch`` finds the entry with the longest common token
  prefix with the new prompt: an exact match, a stored prefix of the prompt,
  or a longer stored sequence trimmed back to the common prefix (trimmable
  caches only, i.e. plain KV caches; sliding-window and recurrent caches
  are reused only when the stored tokens are a prefix of the prompt).
- **Ownership.**  ``fetch`` returns a deep copy: new cache objects (offsets
  of their own) whose arrays share the stored buffers.  MLX arrays are
  copy-on-write, so the copy costs nothing; trimming only moves the copy's
  offset, and ``BatchGenerator`` merges the copy into its own batch buffers.
  The stored entry is never mutated, so any number of requests, concurrent
  ones included, may reuse it.

Everything here runs on the MLX thread.
"""

from __future__ import annotations

from typing import Iterable, Optional

#: Most entries one model's store keeps (each entry is one finished sequence).
MAX_ENTRIES = 64
#: The trie is per store already; LRUPromptCache wants a model key anyway.
_KEY = "model"


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


class PromptCacheStore:
    """One model's reusable KV caches (MLX thread only)."""

    def __init__(self, max_bytes: int, max_entries: int = MAX_ENTRIES) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def fetch(self, prompt: list[int]) -> tuple[Optional[list], int]:
        """(a private copy of the best cache, the number of prompt tokens it holds), or (None, 0).

        The count is at most ``len(prompt) - 1``: the batch must evaluate at
        least the last prompt token to get the logits of the first new one.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if len(prompt) < 2 or len(self._lru) == 0:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(_KEY, prompt)
        if cache is None:
            return None, 0
        if not rest:
            # Exact match: give the last prompt token back to the batch.
            if not can_trim_prompt_cache(cache) or trim_prompt_cache(cache, 1) != 1:
                return None, 0
            rest = prompt[-1:]
        n = len(prompt) - len(rest)
        if n <= 0 or any(getattr(c, "offset", n) != n for c in cache):
            return None, 0
        return cache, n

    def insert(self, tokens: list[int], cache: list) -> bool:
        """Keep ``cache`` (holding exactly ``tokens``); False when it alone is over the bound."""
        import mlx.core as mx

        if not tokens or not cache:
            return False
        # The extracted cache is lazy (a slice of the batch's buffers): make it real.
        mx.eval([c.state for c in cache])
        if cache_nbytes(cache) > self.max_bytes:
            return False
        self._lru.insert_cache(_KEY, list(tokens), cache)
        return True

    def trim_to(self, n_bytes: int) -> None:
        """Evict least recently stored entries until at most ``n_bytes`` remain."""
        self._lru.trim_to(n_bytes=max(0, n_bytes))

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)


def enforce_budget(stores: Iterable[PromptCacheStore], max_bytes: int) -> None:
    """Hold all models' stores together to ``max_bytes``.

    ``stores`` in eviction order (the least recently used model first): its
    entries go first, the current model's last.
    """
    stores = list(stores)
    excess = sum(s.nbytes for s in stores) - max_bytes
    for store in stores:
        if excess <= 0:
            return
        before = store.nbytes
        store.trim_to(before - excess)
        excess -= before - store.nbytes


def new_store(max_bytes: int) -> Optional[PromptCacheStore]:
    """A store for a newly loaded model, or None when reuse is off (``max_bytes <= 0``)."""
    return PromptCacheStore(max_bytes) if max_bytes > 0 else None
