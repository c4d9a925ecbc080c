"""Decode attention that does not read the padding of short rows.

mlx-lm's batch cache (``BatchKVCache``) keeps every row right-aligned to one
write position: a row shorter than the longest is left-padded, and a decode
step's attention runs every row over the longest row's length, the padding
masked out.  When a long prompt joins streams with short contexts, every
stream then pays attention over the long one's length at every step (on a
CPU, a ~1,900-token newcomer among ~500-token streams made each of their
steps about 3x slower until it left).

:func:`decode_attention` splits a decode step's rows in two when that
padding is most of the work: the short rows attend over their own longest
length only, the long rows over theirs.  The layer's own attention module
runs once per group against a view of the cache (:class:`_Rows`) that
returns the group's window with the new position appended; the new keys and
values of both groups are then written into the batch's buffer in one
update, as the cache itself would.  Called by ``mixed.py``'s split
attention (the same model families), for plain caches only.  MLX thread only.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

#: Split when the short rows' padding is more than this share of the
#: attention a decode step does.
MIN_WASTE = 0.4
#: Rows at most this share of the longest row's length are "short".
SHORT = 0.5


class _Rows:
    """One group's view of a batch cache for one decode step."""

    def __init__(self, cache: BatchKVCache, rows: mx.array, start: int) -> None:
        self.cache, self.rows, self.start = cache, rows, start
        self.offset = cache.offset[rows]
        self.new: Optional[tuple] = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        c = self.cache
        self.new = (keys, values)
        old_k = c.keys[self.rows, :, self.start : c._idx, :]
        old_v = c.values[self.rows, :, self.start : c._idx, :]
        return mx.concatenate([old_k, keys], axis=2), mx.concatenate([old_v, values], axis=2)


def _groups(cache: BatchKVCache) -> Optional[tuple[tuple[list[int], int], tuple[list[int], int]]]:
    """The long rows and the short rows, each with where its window starts;
    None when the padding is not worth a split."""
    idx = cache._idx
    pads = _pads(cache)
    lengths = [idx - p for p in pads]
    longest = max(lengths)
    short = [i for i, n in enumerate(lengths) if n <= SHORT * longest]
    if not short or len(short) == len(lengths):
        return None
    window = max(lengths[i] for i in short)
    waste = len(short) * (longest - window)
    if waste < MIN_WASTE * len(lengths) * longest:
        return None
    long = [i for i in range(len(lengths)) if i not in set(short)]
    return (long, min(pads[i] for i in long)), (short, idx - window)


def _pads(cache: BatchKVCache) -> list[int]:
    """The rows' left padding as numbers, read once per change of the array
    (a join or a removal): reading it waits for the work queued before it,
    which would stop every decode step from overlapping the previous one."""
    known = getattr(cache, "_ragged_pads", None)
    if known is None or known[0] is not cache.left_padding:
        known = cache._ragged_pads = (cache.left_padding, cache.left_padding.tolist())
    return known[1]


def applies(x: mx.array, cache: Any) -> bool:
    return (
        x.shape[1] == 1
        and x.shape[0] > 1
        and isinstance(cache, BatchKVCache)
        and not hasattr(cache, "bits")
        and type(cache).update_and_fetch is BatchKVCache.update_and_fetch
        and cache.keys is not None
    )


def decode_attention(call: Callable, x: mx.array, mask: Any, cache: BatchKVCache) -> mx.array:
    """The layer's attention (``call``) for a decode step of ``x`` (``[rows, 1, dim]``)."""
    groups = _groups(cache)
    if groups is None:
        return call(x, mask, cache)
    idx = cache._idx
    if idx + 1 > cache.keys.shape[2]:
        _grow(cache)
    pads = cache.left_padding
    outs, views = [], []
    for rows, begin in groups:
        r = mx.array(rows)
        view = _Rows(cache, r, begin)
        # Position j of the window is valid where the row has started.
        valid = mx.arange(begin, idx + 1)[None] >= pads[r][:, None]
        outs.append(call(x[r], valid[:, None, None, :], view))
        views.append(view)
    order = mx.array(groups[0][0] + groups[1][0])
    inverse = mx.argsort(order)
    new_k = mx.concatenate([v.new[0] for v in views])[inverse]
    new_v = mx.concatenate([v.new[1] for v in views])[inverse]
    cache.keys[..., idx : idx + 1, :] = new_k
    cache.values[..., idx : idx + 1, :] = new_v
    cache.offset = cache.offset + 1
    cache._idx = idx + 1
    return mx.concatenate(outs)[inverse]


def _grow(cache: BatchKVCache) -> None:
    """Room for one more position, as ``BatchKVCache.update_and_fetch`` makes it."""
    b, h, _, dk = cache.keys.shape
    dv = cache.values.shape[3]
    step = cache.step
    if cache._idx % step != 0:
        cache.keys = cache.keys[..., : cache._idx, :]
        cache.values = cache.values[..., : cache._idx, :]
    cache.keys = mx.concatenate([cache.keys, mx.zeros((b, h, step, dk), cache.keys.dtype)], axis=2)
    cache.values = mx.concatenate([cache.values, mx.zeros((b, h, step, dv), cache.values.dtype)], axis=2)
