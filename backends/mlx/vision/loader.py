"""Loading a VLM with mlx-vlm (MLX thread), and the text view the engine batches.

The engine's per-model batch is mlx-lm's ``BatchGenerator``, which calls
``model(token_ids, cache=...)`` for logits and builds caches from
``model.layers``.  ``TextView`` is that for a VLM's language model: text-only
requests run through it exactly as through a text model, and image requests
join it once their images are in their KV cache (``prefill.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.mlx.vision import mrope
from backends.mlx.vision.arch import batches_images, uses_mrope, vision_type
from backends.mlx.vision.detail import untiled


@dataclass(eq=False)
class Vision:
    """What a loaded VLM has beyond its text view (owned by the MLX thread,
    but ``processor`` is used by worker threads to build prompts: HF processors
    keep no state between calls)."""

    model: Any  # mlx-vlm's Model: vision tower, projector, language model
    processor: Any  # mlx-vlm / transformers processor: images -> pixels, prompt expansion
    model_type: str
    #: Token ids that stand for image features in prompts (the prompt cache keys them by content).
    image_token_ids: frozenset
    takes_images: bool = True
    #: The text view is ``mrope.py``'s: each sequence's cache carries its position delta.
    mrope: bool = False
    #: The processor with image tiling off, for requests whose images are all "low" detail (``detail.py``).
    untiled_processor: Any = None


def _text_view(vlm):
    import mlx.nn as nn

    class TextView(nn.Module):
        """A VLM's language model as mlx-lm sees a text model: ids in, logits out."""

        def __init__(self, language_model) -> None:
            super().__init__()
            self.language_model = language_model

        @property
        def layers(self):
            return vlm.layers

        def make_cache(self):
            if hasattr(self.language_model, "make_cache"):
                return self.language_model.make_cache()
            from mlx_lm.models.cache import KVCache

            return [KVCache() for _ in self.layers]

        def __call__(self, inputs, cache=None, input_embeddings=None, **kwargs):
            out = self.language_model(inputs, inputs_embeds=input_embeddings, cache=cache)
            return getattr(out, "logits", out)

    return TextView(vlm.language_model)


def _image_token_ids(vlm, processor) -> frozenset:
    ids = set()
    cfg = vlm.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    tok = getattr(processor, "tokenizer", processor)
    token = getattr(processor, "image_token", None)
    if isinstance(token, str):
        value = tok.convert_tokens_to_ids(token)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    return frozenset(ids)


def load(path: Path, config: dict):
    """(text view, mlx-lm tokenizer wrapper, Vision) of the VLM at ``path``."""
    from mlx_lm.utils import load_tokenizer
    from mlx_vlm.utils import load as load_vlm

    model_type = vision_type(config) or str(config.get("model_type"))
    vlm, processor = load_vlm(str(path))
    eos = config.get("eos_token_id") or (config.get("text_config") or {}).get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    eos_ids += list(getattr(processor, "additional_eos_token_ids", None) or [])
    tokenizer = load_tokenizer(path, eos_token_ids=sorted(set(eos_ids)) or None)
    vision = Vision(vlm, processor, model_type, _image_token_ids(vlm, processor),
                    takes_images=batches_images(model_type), mrope=uses_mrope(model_type),
                    untiled_processor=untiled(processor))
    return (mrope.text_view(vlm) if vision.mrope else _text_view(vlm)), tokenizer, vision
