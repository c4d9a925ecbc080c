"""A quantized KV cache for the running batch and the prompt-cache store.

On Apple silicon, decoding a long context is bound by the bytes each step
reads, and the KV cache is what bounds how many streams fit.  mlx-lm can
quantize one sequence's cache (``QuantizedKVCache``, ``generate_step``'s
``kv_bits``) but its ``BatchGenerator`` cannot: its batch cache
(``BatchKVCache``) is full precision.  This module adds the pieces the batch
needs, and nothing else:

- :class:`BatchQuantizedKVCache`, a ``BatchKVCache`` whose keys and values
  are mlx's packed triples (``mx.quantize``: packed uint32 values, scales,
  biases) once it holds more than ``quant_start`` positions (before that it
  is full precision, as ``BatchKVCache``).  Everything the batch does to a
  cache (left padding, right-padded prefill, joins (``extend``/``merge``),
  removals (``filter``), extracting one row) works on either form.
  mlx-lm's attention takes the quantized path when the cache has a ``bits``
  attribute (``models/base.scaled_dot_product_attention``), so ``bits`` is
  a property that exists only once the cache is quantized.
- Two one-sequence caches the batch merges into it (mlx-lm merges with the
  first sequence's cache class): :class:`QuantizedSequenceCache` (mlx-lm's
  ``QuantizedKVCache``) and :class:`PlainSequenceCache` (its ``KVCache``,
  for a cache not quantized yet).  Finished sequences leave their cache in
  the prompt-cache store in one of these forms: stored quantized, an entry
  takes the bytes the batch held for it, so the same
  ``prompt_cache_bytes`` holds more entries.
- :func:`plan` (at load): which layers are quantized.  Only plain attention
  caches (mlx-lm's ``KVCache``) whose key and value widths are multiples of
  the group size; sliding-window (``RotatingKVCache``), state-space
  (``ArraysCache``) and other layers keep their own caches, at full
  precision, with one log line per model.
- :func:`adopt` (at insertion): a sequence's cache (fresh, from the store,
  or from a vision prefill) in the classes above, so the batch merges it
  into a :class:`BatchQuantizedKVCache`.

Memory: every cache reports ``nbytes`` as the sum of its arrays (packed
values, scales and biases for a quantized one), which is what
``mlxgate_kv_cache_memory_bytes`` and the store's byte bound add up.

Everything here runs on the MLX thread.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_map, tree_reduce
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, dynamic_roll, make_prompt_cache

from mlxgate.config import KVCacheSettings

log = logging.getLogger(__name__)

#: A layer's plan: its settings when quantized, None when kept as the model makes it.
Plan = list[Optional[KVCacheSettings]]


def _nbytes(keys: Any, values: Any) -> int:
    if keys is None:
        return 0
    return tree_reduce(lambda total, x: total + x.nbytes, (keys, values), 0)


def _length(x: Any) -> int:
    """Positions held by a cache buffer: an array or a quantized triple."""
    return (x[0] if isinstance(x, tuple) else x).shape[2]


def _quantize(x: mx.array, q: KVCacheSettings) -> tuple:
    return tuple(mx.quantize(x, group_size=q.group_size, bits=q.bits))


class QuantizedSequenceCache(QuantizedKVCache):
    """One sequence's quantized cache of one layer (a batch row, a store entry)."""

    def __init__(self, quant: KVCacheSettings) -> None:
        super().__init__(group_size=quant.group_size, bits=quant.bits)
        self.quant = quant

    def size(self) -> int:
        return self.offset

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys, self.values)

    @classmethod
    def merge(cls, caches: list) -> "BatchQuantizedKVCache":
        return BatchQuantizedKVCache.merge(caches)


class PlainSequenceCache(KVCache):
    """One sequence's cache of a quantized layer that is still full precision."""

    def __init__(self, quant: KVCacheSettings) -> None:
        super().__init__()
        self.quant = quant

    @classmethod
    def merge(cls, caches: list) -> "BatchQuantizedKVCache":
        return BatchQuantizedKVCache.merge(caches)


def _is_quantized(c: Any) -> bool:
    return isinstance(c, QuantizedSequenceCache) or (isinstance(c, BatchQuantizedKVCache) and c.quantized)


class BatchQuantizedKVCache(BatchKVCache):
    """mlx-lm's ``BatchKVCache`` with its buffers quantized past ``quant_start`` positions."""

    def __init__(self, left_padding: list[int], quant: KVCacheSettings) -> None:
        super().__init__(left_padding)
        self.quant = quant
        self.quantized = False

    # mlx-lm's attention reads these (only when ``bits`` exists: quantized).
    @property
    def bits(self) -> int:
        if not self.quantized:
            raise AttributeError("bits")  # full precision so far: the plain attention path
        return self.quant.bits

    @property
    def group_size(self) -> int:
        return self.quant.group_size

    def quantize_now(self) -> None:
        """Turn the buffers (if any) into quantized ones; from now on new positions are quantized too."""
        if not self.quantized:
            if self.keys is not None:
                self.keys, self.values = _quantize(self.keys, self.quant), _quantize(self.values, self.quant)
            self.quantized = True

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if not self.quantized:
            if self._idx + keys.shape[2] <= self.quant.quant_start:
                return super().update_and_fetch(keys, values)
            self.quantize_now()
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or prev + n > _length(self.keys):
            size = (self.step + n - 1) // self.step * self.step
            new_k, new_v = self._zeros(keys, size), self._zeros(values, size)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                if prev % self.step != 0:
                    self.keys, self.values = tree_map(lambda x: x[..., :prev, :], (self.keys, self.values))
                self.keys, self.values = tree_map(
                    lambda a, b: mx.concatenate([a, b], axis=2), (self.keys, self.values), (new_k, new_v)
                )
        self.offset = self.offset + n
        self._idx += n
        for buf, new in ((self.keys, _quantize(keys, self.quant)), (self.values, _quantize(values, self.quant))):
            for b, x in zip(buf, new):
                b[..., prev : self._idx, :] = x
        return self.keys_and_values()

    def _zeros(self, like: mx.array, size: int) -> tuple:
        """Empty quantized buffers for ``size`` positions of arrays shaped like ``like``."""
        B, H, _, D = like.shape
        per_word = 32 // self.quant.bits
        groups = D // self.quant.group_size
        return (
            mx.zeros((B, H, size, D // per_word), dtype=mx.uint32),
            mx.zeros((B, H, size, groups), dtype=like.dtype),
            mx.zeros((B, H, size, groups), dtype=like.dtype),
        )

    def keys_and_values(self):
        return tree_map(lambda x: x[..., : self._idx, :], (self.keys, self.values))

    def finalize(self) -> None:
        if self._right_padding is not None:
            padding = self._right_padding
            self.keys, self.values = tree_map(
                lambda x: dynamic_roll(x, padding[:, None], axis=2), (self.keys, self.values)
            )
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v) -> None:
        self.keys, self.values, self.offset, self.left_padding, self._idx = v
        self.quantized = isinstance(self.keys, tuple)

    def filter(self, batch_indices) -> None:
        """Keep the rows ``batch_indices`` (sequences that left are dropped), then drop shared left padding."""
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices], (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        min_left_pad = min(self.left_padding.tolist())
        if min_left_pad > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(lambda x: x[..., min_left_pad:, :], (self.keys, self.values))
            self._idx -= min_left_pad
            self.left_padding -= min_left_pad

    def extend(self, other: "BatchQuantizedKVCache") -> None:
        """Append ``other``'s rows (sequences joining the batch), both right-aligned at the longer index."""
        if self.quantized or other.quantized:
            self.quantize_now()
            other.quantize_now()
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        ref = self if self.keys is not None else other
        max_idx = max(self._idx, other._idx)
        max_size = max(_length(c.keys) for c in (self, other) if c.keys is not None)

        def pad(c: "BatchQuantizedKVCache"):
            k, v = c.keys, c.values
            if k is None:
                rows = c.offset.shape[0]
                k, v = tree_map(lambda x: mx.zeros((rows, x.shape[1], 0, x.shape[3]), x.dtype), (ref.keys, ref.values))
            left = max_idx - c._idx
            right = max_size - _length(k) - left
            if right < 0:
                k, v = tree_map(lambda x: x[..., :right, :], (k, v))
                right = 0
            if left or right:
                k, v = tree_map(lambda x: mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)]), (k, v))
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = pad(self), pad(other)
        self.keys, self.values = tree_map(lambda a, b: mx.concatenate([a, b]), (k1, v1), (k2, v2))
        self.offset = mx.concatenate([o1, o2])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = max_idx

    def extract(self, idx: int):
        """Row ``idx`` as a one-sequence cache (what the store keeps of a finished sequence)."""
        padding = self.left_padding.tolist()[idx]
        cache = QuantizedSequenceCache(self.quant) if self.quantized else PlainSequenceCache(self.quant)
        if self.keys is not None:
            cache.keys, cache.values = tree_map(
                lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx]), (self.keys, self.values)
            )
            cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches: list) -> "BatchQuantizedKVCache":
        """One batch cache of one-sequence caches (left-padded to the longest);
        quantized when any of them is, or when the longest is past ``quant_start``."""
        quant = caches[0].quant
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        longest = max(lengths)
        if longest == 0:
            return cls([0] * len(caches), quant)
        quantized = longest > quant.quant_start or any(_is_quantized(c) for c in caches)

        def content(c: Any):
            k, v = tree_map(lambda x: x[..., : c.offset, :], (c.keys, c.values))
            if quantized and not _is_quantized(c):
                k, v = _quantize(k, quant), _quantize(v, quant)
            return k, v

        parts = [content(c) if n else None for c, n in zip(caches, lengths)]
        ref = next(p for p in parts if p is not None)
        rows = []
        for part, n in zip(parts, lengths):
            if part is None:
                rows.append(tree_map(lambda x: mx.zeros((1, x.shape[1], longest, x.shape[3]), x.dtype), ref))
            else:
                rows.append(tree_map(lambda x, p=longest - n: mx.pad(x, [(0, 0), (0, 0), (p, 0), (0, 0)]), part))
        cache = cls([longest - n for n in lengths], quant)
        cache.keys, cache.values = tree_map(lambda *xs: mx.concatenate(xs, axis=0), *rows)
        cache.offset += longest
        cache._idx = longest
        cache.quantized = quantized
        return cache

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys, self.values)


def plan(model: Any, settings: KVCacheSettings, name: str) -> Optional[Plan]:
    """Which of ``model``'s layers get a quantized cache; None when none do
    (quantization off, or no layer can take it: one log line says why).

    The widths of keys and values are read from a one-token forward pass on
    a scratch cache (a decode step's cost, once per load).
    """
    if settings.bits is None:
        return None
    try:
        probe = make_prompt_cache(model)
        model(mx.array([[0]]), cache=probe)
        mx.eval([c.state for c in probe])
    except Exception as e:  # noqa: BLE001 - an unusual model: serve it at full precision
        log.warning("%s: KV cache kept at full precision (kv_bits=%d): could not probe its cache: %s: %s",
                    name, settings.bits, type(e).__name__, e)
        return None
    layers: Plan = []
    kept: Counter = Counter()
    for i, c in enumerate(probe):
        if i >= len(model.layers):  # not a layer's (vision/mrope.py's positions): kept, unreported
            layers.append(None)
        elif type(c) is not KVCache:
            kept[type(c).__name__] += 1
            layers.append(None)
        elif c.keys is None or c.keys.shape[-1] % settings.group_size or c.values.shape[-1] % settings.group_size:
            width = "?" if c.keys is None else f"{c.keys.shape[-1]}/{c.values.shape[-1]}"
            kept[f"key/value width {width}, not a multiple of kv_group_size {settings.group_size}"] += 1
            layers.append(None)
        else:
            layers.append(settings)
    quantized = sum(q is not None for q in layers)
    why = ", ".join(f"{k}: {n}" for k, n in sorted(kept.items()))
    if not quantized:
        log.warning("%s: KV cache kept at full precision (kv_bits=%d): no layer's cache can be quantized (%s)",
                    name, settings.bits, why)
        return None
    if kept:
        log.warning("%s: KV cache at %d bits in %d of %d layers; kept at full precision: %s",
                    name, settings.bits, quantized, min(len(layers), len(model.layers)), why)
    else:
        log.info("%s: KV cache at %d bits (groups of %d, from position %d)",
                 name, settings.bits, settings.group_size, settings.quant_start)
    return layers


def adopt(model: Any, layers: Plan, cache: Optional[list]) -> list:
    """``cache`` (None: a fresh one) with the planned layers in this module's
    one-sequence classes, so the batch merges them into quantized batch caches."""
    if cache is None:
        cache = make_prompt_cache(model)
    out = []
    for c, quant in zip(cache, layers):
        if quant is None or isinstance(c, (QuantizedSequenceCache, PlainSequenceCache)):
            out.append(c)
        elif type(c) is KVCache:
            plain = PlainSequenceCache(quant)
            plain.keys, plain.values, plain.offset = c.keys, c.values, c.offset
            out.append(plain)
        else:
            raise TypeError(f"layer cache {type(c).__name__} where a plain KV cache was planned")
    return out
