"""Multimodal rotary positions (M-RoPE: Qwen2-VL, Qwen2.5-VL) in the engine's batch.

These language models rotate each token by a (time, height, width) position
triple: text tokens count up on all three, an image's tokens take their row
and column on the image's grid, so after an image a sequence's position runs
behind its token count by its ``rope_delta`` (negative).  mlx-lm's
``BatchGenerator`` knows only each row's token count (its KV cache offset),
and mlx-vlm's ``LanguageModel`` keeps the delta of the last prompt it saw in
model state, one for the whole model; so this module drives the language
model itself, with positions it computes per row:

- the prompt's positions come from mlx-vlm's own ``get_rope_index`` (``place``,
  at admission) and go with each chunk of the image prefill
  (``prefill.ImagePrefill``);
- every sequence's cache list carries one more entry than the model has
  layers, ``RopeDeltas``: that row's delta (0 for text).  It is a cache
  object like the layers', so it follows its row through everything the
  batch does to rows (merge, extend, filter, extract, the prompt-cache
  store's copies and trims), in whatever order the batch holds them;
- ``TextView`` computes each call's positions as the layers' per-row offsets
  plus those deltas and calls mlx-vlm's ``Qwen2Model`` with them: B rows,
  each at its own position, text and image sequences in one batch.

Architectures whose language model takes more than positions from the
vision side (Qwen3-VL's deepstack features) are not driven here.
"""

from __future__ import annotations

from typing import Any, Optional


class RopeDeltas:
    """The last entry of an M-RoPE model's cache list: each row's position delta.

    It holds no keys or values; it implements what mlx-lm's batch and prompt
    cache ask of a cache entry so the deltas stay with their rows.
    """

    def __init__(self, deltas: Optional[list[int]] = None) -> None:
        import mlx.core as mx

        self.deltas = mx.array(deltas if deltas is not None else [0], dtype=mx.int32)

    # -- what the batch and the prompt-cache store call
    @property
    def state(self):
        return (self.deltas,)

    @state.setter
    def state(self, v) -> None:
        (self.deltas,) = v

    @property
    def nbytes(self) -> int:
        return self.deltas.nbytes

    def size(self) -> int:
        return 0

    def empty(self) -> bool:
        return False

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Trimming tokens off the end leaves the delta: it changes only at images."""
        return n

    def prepare(self, **kwargs) -> None:
        pass

    def finalize(self) -> None:
        pass

    def filter(self, batch_indices) -> None:
        import mlx.core as mx

        self.deltas = self.deltas[mx.array(batch_indices, dtype=mx.int32)]

    def extend(self, other: "RopeDeltas") -> None:
        import mlx.core as mx

        self.deltas = mx.concatenate([self.deltas, other.deltas])

    def extract(self, idx: int) -> "RopeDeltas":
        return RopeDeltas([int(self.deltas[idx].item())])

    @classmethod
    def merge(cls, caches: list) -> "RopeDeltas":
        import mlx.core as mx

        merged = cls([])
        merged.deltas = mx.concatenate([c.deltas for c in caches])
        return merged


def text_view(vlm: Any):
    """mlx-lm's view of an M-RoPE VLM's language model: ids in, logits out,
    every row at its own multimodal position (see the module docstring)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.cache import KVCache

    class TextView(nn.Module):
        def __init__(self, language_model) -> None:
            super().__init__()
            self.language_model = language_model

        @property
        def layers(self):
            return vlm.layers

        def make_cache(self):
            return [KVCache() for _ in self.layers] + [RopeDeltas()]

        def __call__(self, inputs, cache=None, input_embeddings=None, position_ids=None, **kwargs):
            lm = self.language_model
            if cache is None:
                cache = self.make_cache()
            if position_ids is None:
                position_ids = batch_positions(cache, inputs.shape[1])
            h = lm.model(inputs, inputs_embeds=input_embeddings, cache=cache[:-1], position_ids=position_ids)
            if lm.args.tie_word_embeddings:
                return lm.model.embed_tokens.as_linear(h)
            return lm.lm_head(h)

    def batch_positions(cache: list, length: int):
        """(3, B, length) positions: each row's token count plus its delta, counting on."""
        offset = cache[0].offset
        start = (offset if isinstance(offset, mx.array) else mx.array([offset])) + cache[-1].deltas
        pos = start.astype(mx.int32)[:, None] + mx.arange(length, dtype=mx.int32)[None, :]
        return mx.broadcast_to(pos[None], (3,) + pos.shape)

    return TextView(vlm.language_model)


def place(view: Any, vision: Any, ids: Any, cache: Optional[list]) -> Optional[list]:
    """At admission (MLX thread): a sequence's delta into its cache's
    ``RopeDeltas``, and for a prompt with images (``ids``: ``VisionIds``) its
    positions (``ids.positions``, (3, 1, L)) for the image prefill.

    ``cache`` is what the prompt cache served (None: nothing).  A text
    sequence with a fresh cache keeps None (the batch's fresh caches have
    delta 0); one with an image gets a fresh cache to carry its delta.  A
    served cache gets the delta of this prompt: a stored cache may come from
    a sequence with another delta (only the prefix before the first image is
    shared then, where the positions are plain).
    """
    import mlx.core as mx

    delta = 0
    if ids is not None:
        grid = ids.pixels.get("image_grid_thw")
        tokens = mx.array([list(ids)])
        positions, deltas = vision.model.language_model.get_rope_index(
            tokens, image_grid_thw=None if grid is None else mx.array(grid))
        ids.positions = positions.astype(mx.int32)
        delta = int(mx.array(deltas).reshape(-1)[0].item())
        ids.rope_delta = delta
        if cache is None:
            cache = view.make_cache()
    if cache is not None:
        cache[-1] = RopeDeltas([delta])
    return cache
