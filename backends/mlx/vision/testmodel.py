"""Tiny vision-language models the project writes itself, offline.

One per architecture of ``families.py`` (``write_test_vlm(..., arch=...)``;
``mlxgate make-test-model DIR --vision --arch NAME``), Idefics3 by default
(``tiny-vlm``): a SigLIP vision tower, a pixel-shuffle connector and a Llama
text model; 32 x 32 crops of 8 x 8 patches give 4 image tokens per crop; an
image is split into up to 2 x 2 crops plus a global view (Idefics3's image
splitting), so one image costs 4 to 5 x (4 + markers) tokens.  Random
weights (gibberish answers) named by mlx-vlm's own model of the
architecture, a byte-level BPE tokenizer trained locally (``testmodel.py``'s)
with the family's image tokens, a chat template that takes image parts, and
the processor files the family's transformers image processor and mlx-vlm
processor read: loading, preprocessing, prompt expansion and the vision
tower all run the real code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from backends.mlx import testmodel as text_model
from backends.mlx.vision.families import CONTEXT, FAMILIES, Family

#: Norm weights set to one (the rest random): LayerNorm/RMSNorm scales by their usual names.
_ONES = ("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight", "pre_layrnorm.weight",
         "layernorm.weight", "ln_pre.weight", "ln_post.weight", "norm1.weight", "norm2.weight")


def _model(config: dict):
    """mlx-vlm's own model for ``config``, built as its loader builds it."""
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    model_class, _ = get_model_and_args(config=config)
    model_config = model_class.ModelConfig.from_dict(config)
    model_config = update_module_configs(model_config, model_class, config, ["text", "vision", "projector"])
    return model_class.Model(model_config)


def _random_weights(config: dict, seed: int, special_ids: list[int]) -> dict:
    """Weights named by mlx-vlm's model of the architecture itself."""
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(_model(json.loads(json.dumps(config))).parameters()))
    return random_weights(params, seed, special_ids, ones=lambda name, shape: name.endswith(_ONES) and len(shape) == 1,
                          fan_in=lambda shape: shape[-1])


def random_weights(params: dict, seed: int, special_ids: list[int], ones: Callable[[str, tuple], bool],
                   fan_in: Callable[[tuple], int]) -> dict:
    """Random fp32 weights shaped as ``params`` (a model's flattened parameters):
    norm scales (``ones``) one, biases zero, the rest scaled by ``fan_in``; the
    special tokens' rows of ``lm_head`` zero, so greedy decoding never picks them."""
    import mlx.core as mx

    keys = mx.random.split(mx.random.key(seed), len(params))
    weights = {}
    for key, name in zip(keys, sorted(params)):
        shape = params[name].shape
        if ones(name, shape):
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
            w = mx.random.normal(shape, key=key) * (1.0 / fan_in(shape) ** 0.5)
        weights[name] = w.astype(mx.float32)
    mx.eval(weights)
    return weights


def write_test_vlm(out_dir: Path, name: str = "", seed: int = 0, arch: str = "idefics3") -> Path:
    """Write ``out_dir/name/`` (config, weights, tokenizer, processor, template) of the architecture
    ``arch`` (a key of ``families.FAMILIES``; name: ``tiny-vlm`` for Idefics3, else ``tiny-<arch>``)
    and return it."""
    import mlx.core as mx
    from tokenizers import AddedToken

    family: Family = FAMILIES[arch]
    path = Path(out_dir) / (name or default_name(arch))
    path.mkdir(parents=True, exist_ok=True)
    tok = text_model.build_tokenizer(fim=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.tokens])
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    specials = text_model.SPECIAL_TOKENS + family.tokens
    ids = {t: tok.token_to_id(t) for t in specials + text_model.TEXT_TOKENS}
    eos = [ids[family.end_of_turn], ids["<|end_of_text|>"]]
    config = {**family.config(vocab_size, ids), "eos_token_id": eos, "bos_token_id": ids["<|begin_of_text|>"],
              "torch_dtype": "float32"}
    weights = _random_weights(config, seed, [ids[t] for t in specials + text_model.TEXT_TOKENS])
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(path / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                 "special": t not in text_model.TEXT_TOKENS}
        for t, i in ids.items()
    }
    template = family.template
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": family.end_of_turn,
        "pad_token": "<|pad|>",
        "model_max_length": CONTEXT,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": template,
        **family.tokenizer_extra,
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": family.end_of_turn, "pad_token": "<|pad|>"}))
    (path / "chat_template.jinja").write_text(template)
    (path / "preprocessor_config.json").write_text(json.dumps(family.preprocessor, indent=2))
    (path / "processor_config.json").write_text(json.dumps(family.processor, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": eos}, indent=2))
    return path


def default_name(arch: str) -> str:
    return "tiny-vlm" if arch == "idefics3" else f"tiny-{arch}"
