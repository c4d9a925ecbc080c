"""Which model folders are vision-language models (config.json only, no import of mlx-vlm)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Optional

#: Architectures whose language model places image tokens with multimodal
#: rotary positions (M-RoPE: a per-sequence offset after each image).  mlx-lm's
#: batch places every token at its index, so their image requests are refused
#: (text requests run); the others (Idefics3/SmolVLM, LLaVA, Gemma 3, PaliGemma,
#: Mistral 3/Pixtral ...) use plain positions.
#:
#: What serving them would take (mlx-vlm 0.7's ``qwen2_vl/language.py`` shows
#: the pieces): (1) the image part's prefill (``prefill.py``) must pass the
#: language model the 3-D position ids that ``get_rope_index(ids,
#: image_grid_thw)`` gives for the whole prompt, sliced per chunk (through
#: ``TextView`` today only ids, cache and embeddings go, so it would compute
#: plain positions), and keep the sequence's ``rope_delta`` (max position + 1 -
#: prompt length, negative after an image); (2) every batched call after that
#: must pass ``rope_deltas`` of shape [batch, 1] in the batch's current row
#: order (0 for text rows): the language model adds it to the batched cache's
#: per-row offsets.  mlx-lm's ``BatchGenerator`` calls the model with ids and
#: cache only and reorders rows as sequences join and leave, so the engine
#: would have to hand ``TextView`` the deltas of the generator's active uids
#: before each ``next()``; its model state (``_rope_deltas``, ``_position_ids``)
#: is per model, not per sequence, and must not be relied on.
MROPE_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe", "glm4v",
                         "glm4v_moe", "ernie4_5_moe_vl"})


@lru_cache(maxsize=1)
def _vlm_models_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("mlx_vlm")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def vision_type(config: dict) -> Optional[str]:
    """The mlx-vlm architecture of a VLM's config, or None for a text model
    (or an architecture this mlx-vlm does not have)."""
    if not isinstance(config.get("vision_config"), dict):
        return None
    model_type = str(config.get("model_type") or "").lower().replace("-", "_")
    root = _vlm_models_dir()
    if not model_type or root is None or not (root / model_type).is_dir():
        return None
    return model_type


def batches_images(model_type: str) -> bool:
    return model_type not in MROPE_TYPES
