"""Which model folders are vision-language models (config.json only, no import of mlx-vlm)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Optional

#: Architectures whose language model places image tokens with multimodal
#: rotary positions (M-RoPE: a per-sequence offset after each image).  mlx-lm's
#: batch places every token at its index; ``mrope.py`` drives the language
#: models of ``MROPE_SERVED`` with per-row positions instead, so their image
#: requests batch with the rest.  The others of ``MROPE_TYPES`` take more from
#: the vision side than positions (Qwen3-VL's deepstack features fed to early
#: layers, ...): their image requests are refused (text requests run).  The
#: remaining architectures (Idefics3/SmolVLM, LLaVA, Gemma 3, PaliGemma,
#: Mistral 3/Pixtral ...) use plain positions.
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


#: M-RoPE architectures whose language model ``mrope.TextView`` drives:
#: mlx-vlm's ``Qwen2Model`` that takes (3, batch, length) position ids.
MROPE_SERVED = frozenset({"qwen2_vl", "qwen2_5_vl"})


def batches_images(model_type: str) -> bool:
    return model_type not in MROPE_TYPES or model_type in MROPE_SERVED


def uses_mrope(model_type: str) -> bool:
    """Whether the model's text view is ``mrope.py``'s (per-row multimodal positions)."""
    return model_type in MROPE_SERVED
