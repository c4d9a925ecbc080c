"""A tiny vision-language model the project writes itself, offline.

The architecture is Idefics3 (SmolVLM's), a real one mlx-vlm loads: a SigLIP
vision tower, a pixel-shuffle connector and a Llama text model.  Sizes are
tiny: 32 x 32 crops of 8 x 8 patches give 4 image tokens per crop; an image is
split into up to 2 x 2 crops plus a global view (Idefics3's image splitting),
so one image costs 4 to 5 x (4 + markers) tokens.  Random weights (gibberish
answers), a byte-level BPE tokenizer trained locally (``testmodel.py``'s) with
Idefics3's image tokens, a chat template that takes image parts, and the
processor files transformers' ``Idefics3ImageProcessor`` and mlx-vlm's
``Idefics3Processor`` read: loading, preprocessing, prompt expansion and the
vision tower all run the real code.
"""

from __future__ import annotations

import json
from pathlib import Path

from backends.mlx import testmodel as text_model

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
#: Idefics3's crop markers, for up to 2 x 2 crops.
ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]

IMAGE_SIZE = 32
PATCH_SIZE = 8
SCALE_FACTOR = 2
#: Image tokens per crop: (32 / 8)² patches, pixel-shuffled by 2².
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
#: Longest side an image is resized to before it is split into crops.
LONGEST_EDGE = 2 * IMAGE_SIZE
CONTEXT = 4096

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<image>' }}{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<end_of_utterance>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _config(vocab_size: int, ids: dict[str, int]) -> dict:
    d = text_model.SIZES["tiny"]
    return {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": ids["<image>"],
        "scale_factor": SCALE_FACTOR,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "eos_token_id": [ids["<end_of_utterance>"], ids["<|end_of_text|>"]],
        "bos_token_id": ids["<|begin_of_text|>"],
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "llama",
            "hidden_size": d.hidden,
            "intermediate_size": d.intermediate,
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "num_hidden_layers": d.layers,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "vocab_size": vocab_size,
            "max_position_embeddings": CONTEXT,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "idefics3_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "patch_size": PATCH_SIZE,
            "image_size": IMAGE_SIZE,
            "num_channels": 3,
            "layer_norm_eps": 1e-6,
        },
    }


def _random_weights(config: dict, seed: int, special_ids: list[int]) -> dict:
    """Weights named by mlx-vlm's Idefics3 model itself."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import idefics3

    from mlx_vlm.utils import update_module_configs

    model_config = update_module_configs(
        idefics3.ModelConfig.from_dict(config), idefics3, config, ["text", "vision"]
    )
    model = idefics3.Model(model_config)
    params = dict(tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    weights = {}
    for key, name in zip(keys, sorted(params)):
        shape = params[name].shape
        if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")):
            w = mx.ones(shape)
        elif name.endswith(".bias"):
            w = mx.zeros(shape)
        elif name.endswith("embed_tokens.weight"):
            w = mx.random.normal(shape, key=key)
        elif name.endswith("lm_head.weight"):
            w = mx.random.normal(shape, key=key) * (3.0 / shape[1] ** 0.5)
            keep = mx.ones((shape[0], 1))
            keep[mx.array(special_ids)] = 0.0  # never picked by greedy decoding
            w = w * keep
        else:
            w = mx.random.normal(shape, key=key) * (1.0 / shape[-1] ** 0.5)
        weights[name] = w.astype(mx.float32)
    mx.eval(weights)
    return weights


def write_test_vlm(out_dir: Path, name: str = "tiny-vlm", seed: int = 0) -> Path:
    """Write ``out_dir/name/`` (config, weights, tokenizer, processor, template) and return it."""
    import mlx.core as mx
    from tokenizers import AddedToken

    path = Path(out_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    tok = text_model.build_tokenizer(fim=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS + ROW_COL_TOKENS])
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    specials = text_model.SPECIAL_TOKENS + IMAGE_TOKENS + ROW_COL_TOKENS
    ids = {t: tok.token_to_id(t) for t in specials + text_model.TEXT_TOKENS}
    config = _config(vocab_size, ids)
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
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<end_of_utterance>",
        "pad_token": "<|pad|>",
        "model_max_length": CONTEXT,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": IMAGE_TOKENS[:2] + IMAGE_TOKENS[3:],
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>", "pad_token": "<|pad|>"}))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor",
        "processor_class": "Idefics3Processor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": LONGEST_EDGE},
        "resample": 1,
        "do_image_splitting": True,
        "max_image_size": {"longest_edge": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
    }, indent=2))
    (path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "Idefics3Processor", "image_seq_len": IMAGE_SEQ_LEN}, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))
    return path
