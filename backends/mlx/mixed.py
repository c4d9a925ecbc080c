"""A decode step and a prefill chunk in one forward pass.

While a long prompt is prefilled beside running streams, each engine step
runs the batch's decode step and a chunk of the prompt (``pacing.py``).  As
two forward passes, each reads every weight: on a CPU a forward pass of a
few rows costs about as much as one of a few dozen, so the chunk pays a
decode step's fixed cost again, and the long prompt waits for it at every
step.  Here the step is one pass: the decode rows' tokens and the chunk's
tokens go through the model as one sequence of ``rows + chunk`` tokens, so
every position-independent layer (embedding, norms, MLP, output head) runs
once over all of them; only attention, where the two belong to different
caches, is split, each part against its own cache with its own mask.

That is sound only for models whose layers treat positions independently
outside ``self_attn`` and whose caches are plain attention caches (no
sliding windows, no state-space layers): :func:`fusable` admits the mlx-lm
families known to be so (``FAMILIES``), text models only.  The split is made
by giving each layer's attention a subclass of its own class (same module
tree, same parameters) whose call splits when it is handed a
:class:`MixedCache` and is the original otherwise.

:func:`fused_step` sets one ``BatchGenerator.next()`` up to run so: the
generation batch's forward becomes the fused pass, and the prompt batch
(``joining.PromptBatch``) is told that the chunk it is about to prefill is
done.  It applies only when exactly one sequence is in prefill and the call
would prefill a chunk of it; otherwise the call runs as mlx-lm's.
MLX thread only.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from backends.mlx import ragged

#: mlx-lm model types whose decoder layers are ``x + self_attn(norm(x))`` then
#: a per-position MLP, with one causal mask for every layer.
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class MixedCache:
    """One layer's view of a fused step: the batch's cache for the first
    ``step.rows`` positions, the prompt's for the rest."""

    def __init__(self, step: "_Step", decode: Any, prompt: Any) -> None:
        self.step, self.decode, self.prompt = step, decode, prompt

    def make_mask(self, *args: Any, **kwargs: Any) -> None:
        # The model's one mask is not used: each part gets its cache's own.
        return None


class _Step:
    """What every layer of one fused pass shares: the split and the two masks
    (the same for every layer: each cache is at the same position in all)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.masks: Optional[tuple] = None


def _split_call(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
    call = super(type(self), self).__call__
    if not isinstance(cache, MixedCache):
        if ragged.applies(x, cache):
            return ragged.decode_attention(call, x, mask, cache)
        return call(x, mask, cache)
    step = cache.step
    rows, width = step.rows, x.shape[-1]
    xd = x[:, :rows].reshape(rows, 1, width)
    xp = x[:, rows:]
    if step.masks is None:
        step.masks = (create_attention_mask(xd, cache.decode), create_attention_mask(xp, cache.prompt))
    if ragged.applies(xd, cache.decode):
        out_d = ragged.decode_attention(call, xd, step.masks[0], cache.decode)
    else:
        out_d = call(xd, step.masks[0], cache.decode)
    out_p = call(xp, step.masks[1], cache.prompt)
    return mx.concatenate([out_d.reshape(1, rows, -1), out_p], axis=1)


_SPLIT_CLASSES: dict[type, type] = {}


def _split_class(cls: type) -> type:
    if cls not in _SPLIT_CLASSES:
        _SPLIT_CLASSES[cls] = type(f"Split{cls.__name__}", (cls,), {"__call__": _split_call})
    return _SPLIT_CLASSES[cls]


def _layers(model: Any) -> Optional[list]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, list) and layers else None


def fusable(model: Any) -> bool:
    """Whether ``model`` can run a decode step and a prefill chunk as one pass."""
    if getattr(model, "model_type", None) not in FAMILIES:
        return False
    layers = _layers(model)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        return False
    if getattr(getattr(model, "args", None), "sliding_window", None) and any(
        getattr(layer, "use_sliding", False) for layer in layers
    ):
        return False
    make = getattr(model, "make_cache", None)
    return make is None or all(type(c) is KVCache for c in make())


def install(model: Any) -> None:
    """Give every layer's attention its splitting subclass (idempotent)."""
    for layer in _layers(model) or []:
        attn = layer.self_attn
        if type(attn) not in _SPLIT_CLASSES.values():
            attn.__class__ = _split_class(type(attn))


def forward(model: Any, decode_tokens: mx.array, decode_cache: list, chunk: list[int], prompt_cache: list) -> mx.array:
    """Logits of the decode rows (``[rows, 1, vocab]``) from one pass that also
    prefills ``chunk`` into ``prompt_cache`` (one sequence)."""
    rows = decode_tokens.shape[0]
    step = _Step(rows)
    tokens = mx.concatenate([decode_tokens.reshape(-1).astype(mx.int32), mx.array(chunk, dtype=mx.int32)])[None]
    caches = [MixedCache(step, d, p) for d, p in zip(decode_cache, prompt_cache)]
    logits = model(tokens, cache=caches)
    return logits[0, :rows, None, :]


class _FusedModel:
    """Stands in for the model in the generation batch's next forward pass."""

    def __init__(self, model: Any, chunk: list[int], prompt_cache: list) -> None:
        self.model, self.chunk, self.prompt_cache = model, chunk, prompt_cache
        self.used = False

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        self.used = True
        return forward(self.model, inputs[:, 0], cache, self.chunk, self.prompt_cache)


def planned_chunk(gen: Any) -> Optional[list[int]]:
    """The chunk the next ``gen.next()`` prefills, when it can be fused with its
    decode step: one sequence in prefill (none waiting to join it), a batch
    decoding, and the chunk not the sequence's last token."""
    if not len(gen._generation_batch) or len(gen._generation_batch) >= gen.completion_batch_size:
        return None
    if gen._unprocessed_sequences or len(gen._prompt_batch) != 1 or len(gen._currently_processing) != 1:
        return None
    segments = gen._currently_processing[0][0]
    if len(segments) == 1 and len(segments[0]) == 1:
        return None  # it joins the batch in this call
    n = min(len(segments[0]), gen.prefill_step_size)
    return segments[0][:n] if n > 0 else None


@contextlib.contextmanager
def fused_step(gen: Any, enabled: bool) -> Iterator[Optional[_FusedModel]]:
    """Run the ``gen.next()`` inside as one fused pass where it applies; the
    pass (its ``used``: it ran) or None."""
    chunk = planned_chunk(gen) if enabled else None
    if chunk is None:
        yield None
        return
    batch, prompt_batch = gen._generation_batch, gen._prompt_batch
    fused = _FusedModel(batch.model, chunk, prompt_batch.prompt_cache)
    batch.model = fused
    prompt_batch.done_chunk = fused
    try:
        yield fused
    finally:
        batch.model = fused.model
        prompt_batch.done_chunk = None
