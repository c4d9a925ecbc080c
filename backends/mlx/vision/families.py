"""What differs between the generated test VLMs of each architecture (``testmodel.py`` writes them).

One ``Family`` per mlx-vlm architecture the engine serves with images: its
image tokens, what its chat template writes for an image part, config.json
(a tiny language model and vision tower in the field names mlx-vlm and
transformers read), and the processor files (transformers' image processor
of that family, built from ``preprocessor_config.json`` with no hub, and
mlx-vlm's processor from ``processor_config.json``).  Sizes are tiny so a
test loads and runs each in about a second; the processing code is the real
one, so how many tokens an image becomes is the family's own rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from backends.mlx import testmodel as text_model

#: The vision towers: 32 x 32 pixels in 8 x 8 patches (4 x 4 = 16 patches per image).
IMAGE_SIZE = 32
PATCH_SIZE = 8
CONTEXT = 4096
#: Idefics3 / SmolVLM: image tokens per crop, (32 / 8)² patches pixel-shuffled by 2².
SCALE_FACTOR = 2
IDEFICS_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
#: Gemma 3: image tokens per image (its projector pools 4 x 4 patches to 2 x 2).
GEMMA3_TOKENS = 4
#: Gemma 3: a sliding window shorter than a test prompt, so its rotating caches wrap.
GEMMA3_WINDOW = 16
#: Pixtral (Mistral 3): longest side an image is resized to (aspect kept, so tokens vary with size).
PIXTRAL_LONGEST = 64

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def chat_template(image: str, end_of_turn: str, *, bos: bool = True) -> str:
    """A Llama-3-style template whose image parts are the family's placeholder ``image``."""
    return (
        ("{{- bos_token }}" if bos else "")
        + "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
        "{%- if message.content is string %}{{- message.content }}"
        "{%- else %}{%- for part in message.content %}"
        "{%- if part.type == 'image' %}{{- '" + image + "' }}{%- elif part.type == 'text' %}{{- part.text }}"
        "{%- endif %}{%- endfor %}{%- endif %}"
        "{{- '" + end_of_turn + "' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    )


def _tiny_llama(vocab_size: int, **extra) -> dict:
    d = text_model.SIZES["tiny"]
    return {"hidden_size": d.hidden, "intermediate_size": d.intermediate, "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads, "num_hidden_layers": d.layers, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "vocab_size": vocab_size, "max_position_embeddings": CONTEXT,
            "tie_word_embeddings": False, **extra}


def _vision(model_type: str, **extra) -> dict:
    return {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 1, "patch_size": PATCH_SIZE, "image_size": IMAGE_SIZE, "num_channels": 3,
            "layer_norm_eps": 1e-6, **extra}


@dataclass(frozen=True)
class Family:
    """One architecture's generated test VLM."""

    model_type: str
    architecture: str
    #: Special tokens the tokenizer gains (image tokens and markers).
    tokens: list[str]
    #: What the chat template writes for one image part.
    placeholder: str
    #: The end-of-turn token (the first eos).
    end_of_turn: str
    #: config.json's model-specific part: (vocab size, token ids) -> dict.
    config: Callable[[int, dict], dict]
    preprocessor: dict
    processor: dict
    #: tokenizer_config.json additions (such as named special tokens the processor reads).
    tokenizer_extra: dict = field(default_factory=dict)
    #: Whether the template starts with the bos token (PaliGemma's processor puts it after the images).
    template_bos: bool = True

    @property
    def template(self) -> str:
        return chat_template(self.placeholder, self.end_of_turn, bos=self.template_bos)


IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
#: Idefics3's crop markers, for up to 2 x 2 crops.
ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]


def _idefics3_config(model_type: str, architecture: str, text_type: str):
    def config(vocab_size: int, ids: dict) -> dict:
        return {"architectures": [architecture], "model_type": model_type, "image_token_id": ids["<image>"],
                "scale_factor": SCALE_FACTOR, "vocab_size": vocab_size, "tie_word_embeddings": False,
                "text_config": _tiny_llama(vocab_size, model_type=text_type),
                "vision_config": _vision(f"{model_type}_vision")}
    return config


def _idefics3_preprocessor(image_processor: str, processor: str) -> dict:
    return {"image_processor_type": image_processor, "processor_class": processor, "do_convert_rgb": True,
            "do_resize": True, "size": {"longest_edge": 2 * IMAGE_SIZE}, "resample": 1, "do_image_splitting": True,
            "max_image_size": {"longest_edge": IMAGE_SIZE}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": MEAN, "image_std": STD, "do_pad": True}


def _gemma3_config(vocab_size: int, ids: dict) -> dict:
    d = text_model.SIZES["tiny"]
    head_dim = d.hidden // d.heads
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "image_token_index": ids["<image_soft_token>"], "boi_token_index": ids["<start_of_image>"],
        "eoi_token_index": ids["<end_of_image>"], "mm_tokens_per_image": GEMMA3_TOKENS,
        "pad_token_id": ids["<|pad|>"], "vocab_size": vocab_size, "hidden_size": d.hidden,
        "text_config": {"model_type": "gemma3_text", "hidden_size": d.hidden, "intermediate_size": d.intermediate,
                        "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "head_dim": head_dim,
                        "num_hidden_layers": d.layers, "rms_norm_eps": 1e-6, "vocab_size": vocab_size,
                        "query_pre_attn_scalar": head_dim, "sliding_window": GEMMA3_WINDOW,
                        "sliding_window_pattern": 2, "mm_tokens_per_image": GEMMA3_TOKENS,
                        "max_position_embeddings": CONTEXT},
        "vision_config": _vision("siglip_vision_model"),
    }


def _llava_config(vocab_size: int, ids: dict) -> dict:
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": ids["<image>"], "vision_feature_select_strategy": "default",
            "vision_feature_layer": -1, "vocab_size": vocab_size, "projector_hidden_act": "gelu",
            "text_config": _tiny_llama(vocab_size, model_type="llama"),
            "vision_config": _vision("clip_vision_model", projection_dim=32, layer_norm_eps=1e-5)}


def _paligemma_config(vocab_size: int, ids: dict) -> dict:
    d = text_model.SIZES["tiny"]
    head_dim = d.hidden // d.heads
    return {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
            "image_token_index": ids["<image>"], "pad_token_id": ids["<|pad|>"], "vocab_size": vocab_size,
            "hidden_size": d.hidden,
            "text_config": {"model_type": "gemma", "hidden_size": d.hidden, "intermediate_size": d.intermediate,
                            "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads, "head_dim": head_dim,
                            "num_hidden_layers": d.layers, "rms_norm_eps": 1e-6, "vocab_size": vocab_size,
                            "num_image_tokens": (IMAGE_SIZE // PATCH_SIZE) ** 2, "max_position_embeddings": CONTEXT},
            "vision_config": _vision("siglip_vision_model", projection_dim=d.hidden)}


def _mistral3_config(vocab_size: int, ids: dict) -> dict:
    d = text_model.SIZES["tiny"]
    return {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
            "image_token_index": ids["[IMG]"], "spatial_merge_size": 2, "vision_feature_layer": -1,
            "vocab_size": vocab_size, "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
            "text_config": _tiny_llama(vocab_size, model_type="mistral", head_dim=d.hidden // d.heads),
            "vision_config": _vision("pixtral", image_size=PIXTRAL_LONGEST, head_dim=16, rope_theta=10000.0)}


FAMILIES: dict[str, Family] = {
    "idefics3": Family(
        "idefics3", "Idefics3ForConditionalGeneration", IDEFICS_TOKENS + ROW_COL_TOKENS, "<image>",
        "<end_of_utterance>", _idefics3_config("idefics3", "Idefics3ForConditionalGeneration", "llama"),
        _idefics3_preprocessor("Idefics3ImageProcessor", "Idefics3Processor"),
        {"processor_class": "Idefics3Processor", "image_seq_len": IDEFICS_SEQ_LEN},
        tokenizer_extra={"additional_special_tokens": IDEFICS_TOKENS[:2] + IDEFICS_TOKENS[3:]}),
    "smolvlm": Family(
        "smolvlm", "SmolVLMForConditionalGeneration", IDEFICS_TOKENS + ROW_COL_TOKENS, "<image>",
        "<end_of_utterance>", _idefics3_config("smolvlm", "SmolVLMForConditionalGeneration", "llama"),
        _idefics3_preprocessor("SmolVLMImageProcessor", "SmolVLMProcessor"),
        {"processor_class": "SmolVLMProcessor", "image_seq_len": IDEFICS_SEQ_LEN},
        tokenizer_extra={"additional_special_tokens": IDEFICS_TOKENS[:2] + IDEFICS_TOKENS[3:]}),
    "gemma3": Family(
        "gemma3", "Gemma3ForConditionalGeneration",
        ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<end_of_turn>"], "<start_of_image>",
        "<end_of_turn>", _gemma3_config,
        {"image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
         "do_convert_rgb": True, "do_resize": True, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
         "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN,
         "image_std": STD, "do_pan_and_scan": False},
        {"processor_class": "Gemma3Processor", "image_seq_length": GEMMA3_TOKENS},
        tokenizer_extra={"extra_special_tokens": {"image_token": "<image_soft_token>",
                                                  "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}}),
    "llava": Family(
        "llava", "LlavaForConditionalGeneration", ["<image>"], "<image>", "<|eot_id|>", _llava_config,
        {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "do_resize": True,
         "size": {"shortest_edge": IMAGE_SIZE}, "do_center_crop": True,
         "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD,
         "do_convert_rgb": True},
        {"processor_class": "LlavaProcessor", "patch_size": PATCH_SIZE, "vision_feature_select_strategy": "default",
         "num_additional_image_tokens": 1, "image_token": "<image>"}),
    "paligemma": Family(
        "paligemma", "PaliGemmaForConditionalGeneration", ["<image>"], "<image>", "<|eot_id|>", _paligemma_config,
        {"image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor", "do_resize": True,
         "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD,
         "image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2},
        {"processor_class": "PaliGemmaProcessor", "image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2},
        template_bos=False),
    "mistral3": Family(
        "mistral3", "Mistral3ForConditionalGeneration", ["[IMG]", "[IMG_BREAK]", "[IMG_END]"], "[IMG]",
        "<|eot_id|>", _mistral3_config,
        {"image_processor_type": "PixtralImageProcessor", "processor_class": "Mistral3Processor", "do_resize": True,
         "size": {"longest_edge": PIXTRAL_LONGEST}, "patch_size": {"height": PATCH_SIZE, "width": PATCH_SIZE},
         "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN,
         "image_std": STD, "do_convert_rgb": True},
        {"processor_class": "Mistral3Processor", "patch_size": PATCH_SIZE, "spatial_merge_size": 2,
         "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}),
}
