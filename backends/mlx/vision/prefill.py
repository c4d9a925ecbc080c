"""A sequence's images into its KV cache (MLX thread), a chunk at a time.

mlx-vlm's ``get_input_embeddings`` runs the vision tower and the projector
and puts the image features where the image tokens are (``begin``, once, at
admission); the language model then evaluates those embeddings, from the
first token the prompt cache did not cover up to the prompt's last token
(excluded: the batch evaluates it, as after a prompt-cache hit, and samples
the first answer token from it).  That evaluation is split into chunks
(``ImagePrefill.advance``), one per turn of the engine's loop, sized by the
model's ``PrefillPacer`` like the batch's own prompt chunks, so running
streams keep their pace while an image request is prefilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from backends.mlx.vision.prompt import VisionIds


def needed(ids: VisionIds, cached: int) -> bool:
    """Whether tokens past the ``cached`` ones hold image features."""
    return cached < ids.end_image


@dataclass(eq=False)
class ImagePrefill:
    """The embeddings of one prompt with images and its cache, filled up to ``pos``."""

    tokens: Any  # mx.array [1, L]
    embeds: Any  # mx.array [1, L, D]
    cache: list
    #: Prompt tokens in the cache: from the prompt cache at first, then evaluated here.
    pos: int
    #: Where the batch takes over (the prompt's last token).
    end: int
    #: Tokens the prompt cache served.
    start: int
    #: The prompt's (3, 1, L) multimodal positions (``mrope.place``); None: plain positions.
    positions: Any = None

    @property
    def total(self) -> int:
        """Tokens this prefill evaluates in all (what the pacer sizes chunks by)."""
        return self.end - self.start

    @property
    def done(self) -> bool:
        return self.pos >= self.end

    def advance(self, view: Any, n: int) -> int:
        """Evaluate up to ``n`` more tokens (at least one); how many were."""
        import mlx.core as mx

        stop = min(self.end, self.pos + max(1, n))
        extra = {} if self.positions is None else {"position_ids": self.positions[:, :, self.pos:stop]}
        view(self.tokens[:, self.pos:stop], cache=self.cache, input_embeddings=self.embeds[:, self.pos:stop], **extra)
        mx.eval([c.state for c in self.cache])
        count, self.pos = stop - self.pos, stop
        if self.done:
            self.tokens = self.embeds = self.positions = None  # the batch needs only the cache
        return count


def begin(view: Any, vision: Any, ids: VisionIds, cache: Optional[list], cached: int) -> ImagePrefill:
    """The vision tower on the request's images, and a prefill to run from ``cached`` on."""
    import mlx.core as mx

    tokens = mx.array([list(ids)])
    pixels = {k: mx.array(v) for k, v in ids.pixels.items()}
    # The prompt's attention mask, as mlx-vlm's own generate passes it (Gemma 3 and PaliGemma need one).
    features = vision.model.get_input_embeddings(tokens, mask=mx.ones(tokens.shape), **pixels)
    embeds = getattr(features, "inputs_embeds", features)
    mx.eval(embeds)
    if cache is None:
        cache = view.make_cache()
    return ImagePrefill(tokens, embeds, cache, cached, len(ids) - 1, cached, getattr(ids, "positions", None))
