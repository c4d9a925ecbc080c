"""A sequence's images into its KV cache (MLX thread).

mlx-vlm's ``get_input_embeddings`` runs the vision tower and the projector
and puts the image features where the image tokens are; the language model
then evaluates those embeddings, from the first token the prompt cache did
not cover up to the prompt's last token (excluded: the batch evaluates it,
as after a prompt-cache hit, and samples the first answer token from it).
"""

from __future__ import annotations

from typing import Any, Optional

from backends.mlx.vision.prompt import VisionIds


def needed(ids: VisionIds, cached: int) -> bool:
    """Whether tokens past the ``cached`` ones hold image features."""
    return cached < ids.end_image


def prefill(view: Any, vision: Any, ids: VisionIds, cache: Optional[list], cached: int, step: int) -> tuple[list, int]:
    """(the cache holding ``ids[:len(ids) - 1]``, that count), evaluating
    ``step`` tokens at a time from ``cached`` on."""
    import mlx.core as mx

    tokens = mx.array([list(ids)])
    pixels = {k: mx.array(v) for k, v in ids.pixels.items()}
    features = vision.model.get_input_embeddings(tokens, **pixels)
    embeds = getattr(features, "inputs_embeds", features)
    end = len(ids) - 1
    if cache is None:
        cache = view.make_cache()
    step = max(1, step)
    for start in range(cached, end, step):
        stop = min(end, start + step)
        view(tokens[:, start:stop], cache=cache, input_embeddings=embeds[:, start:stop])
        mx.eval([c.state for c in cache])
    return cache, end
