"""A tiny Qwen2-VL or Qwen2.5-VL the project writes itself, offline (``make-test-model --vision --arch qwen2_vl``).

Qwen2-VL is the architecture with multimodal rotary positions (M-RoPE,
``mrope.py``) that mlx-vlm runs most plainly: a ViT over 14 x 14 patches (two
frames deep), a 2 x 2 patch merger and a Qwen2 text model whose rotary
positions are (time, height, width) triples.  Sizes are tiny: an image is
resized to between 4 x 4 and 8 x 8 patches, so it becomes 4 to 16 image
tokens, laid out on a 2-D grid of positions, which is what makes the
sequence's position run behind its token count after the image (its
``rope_delta``).  Random weights (gibberish answers), the project's locally
trained byte-level BPE tokenizer with Qwen's special tokens, Qwen's chat
template shape, and the processor files mlx-vlm's ``Qwen2VLProcessor`` and
its numpy port of transformers' ``Qwen2VLImageProcessor`` read: loading,
preprocessing, prompt expansion and the vision tower all run the real code.
Qwen2.5-VL (``arch="qwen2_5_vl"``) is the same language model and positions
with its own vision tower (RMS norms, SwiGLU, windowed attention).
"""

from __future__ import annotations

import json
from pathlib import Path

from backends.mlx import testmodel as text_model
from backends.mlx.vision.testmodel import random_weights

QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
#: Image area bounds (pixels): 4 x 4 to 8 x 8 patches, i.e. 4 to 16 image tokens after the 2 x 2 merge.
MIN_PIXELS = (4 * PATCH_SIZE) ** 2
MAX_PIXELS = (8 * PATCH_SIZE) ** 2
CONTEXT = 4096
#: Norm scales set to one.
_ONES = ("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")
#: The architectures written (mlx-vlm's model_type -> Hugging Face's class name).
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
#: ``make-test-model --arch`` names and the model each writes by default.
NAMES = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl"}

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _vision_config(arch: str, text_hidden: int) -> dict:
    common = {"model_type": arch, "depth": 2, "num_heads": 2, "in_channels": 3, "patch_size": PATCH_SIZE,
              "spatial_patch_size": PATCH_SIZE, "spatial_merge_size": MERGE_SIZE,
              "temporal_patch_size": TEMPORAL_PATCH_SIZE}
    if arch == "qwen2_vl":
        return {**common, "embed_dim": 32, "hidden_size": text_hidden, "mlp_ratio": 2}
    # Qwen2.5-VL: windowed attention in the blocks but the last (windows of 2 x 2 merged tokens).
    return {**common, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": text_hidden,
            "window_size": 2 * MERGE_SIZE * PATCH_SIZE, "fullatt_block_indexes": [1], "tokens_per_second": 2}


def _config(vocab_size: int, ids: dict[str, int], size: str, arch: str) -> dict:
    d = text_model.SIZES[size]
    half = d.hidden // d.heads // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # (t, h, w) shares of the rotary frequencies
    return {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "num_hidden_layers": d.layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": section},
        "max_position_embeddings": CONTEXT,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "bos_token_id": ids["<|endoftext|>"],  # as Qwen's configs name it (the tokenizer adds none)
        "torch_dtype": "float32",
        "vision_config": _vision_config(arch, d.hidden),
    }


def _random_weights(config: dict, seed: int, special_ids: list[int]) -> dict:
    """Weights named and shaped by mlx-vlm's model itself (the vision tower's
    convolution scaled by its whole fan-in)."""
    import importlib
    import math

    from mlx.utils import tree_flatten
    from mlx_vlm.utils import update_module_configs

    arch = importlib.import_module(f"mlx_vlm.models.{config['model_type']}")
    cfg = json.loads(json.dumps(config))  # from_dict adds text_config to the dict it reads, as in mlx-vlm's load
    model_config = update_module_configs(arch.ModelConfig.from_dict(cfg), arch, cfg, ["text", "vision"])
    params = dict(tree_flatten(arch.Model(model_config).parameters()))
    return random_weights(params, seed, special_ids, ones=lambda name, shape: name.endswith(_ONES),
                          fan_in=lambda shape: math.prod(shape[1:]))


def write_test_qwen_vl(out_dir: Path, name: str = "tiny-qwen2-vl", seed: int = 0, size: str = "tiny",
                       arch: str = "qwen2_vl") -> Path:
    """Write ``out_dir/name/`` (config, weights, tokenizer, processor, template) and return it;
    ``size``: the text model's, a key of ``testmodel.SIZES``; ``arch``: a key of ``ARCHITECTURES``."""
    import mlx.core as mx
    from tokenizers import AddedToken, processors

    path = Path(out_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    tok = text_model.build_tokenizer(fim=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_TOKENS])
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")  # Qwen adds no BOS
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    specials = text_model.SPECIAL_TOKENS + QWEN_TOKENS
    ids = {t: tok.token_to_id(t) for t in specials + text_model.TEXT_TOKENS}
    config = _config(vocab_size, ids, size, arch)
    weights = _random_weights(config, seed, [ids[t] for t in specials + text_model.TEXT_TOKENS])
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(path / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                 "special": t not in text_model.TEXT_TOKENS}
        for t, i in ids.items()
    }
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": CONTEXT,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": QWEN_TOKENS[1:],
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    image_processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": PROCESSORS[arch],
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(
        {**image_processor, "video_processor_type": "Qwen2VLVideoProcessor"}, indent=2))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": PROCESSORS[arch]}, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}, indent=2))
    return path
