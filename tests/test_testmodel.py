"""The generated test model: deterministic, and loads like a real mlx-lm checkpoint."""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
from mlx_lm.utils import load

from backends.mlx.testmodel import write_test_model


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_test_model(tmp_path / "a", "m", seed=0)
    b = write_test_model(tmp_path / "b", "m", seed=0)
    c = write_test_model(tmp_path / "c", "m", seed=1)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]
    assert _digest(a)["tokenizer.json"] == _digest(c)["tokenizer.json"]


def test_loads_through_mlx_lm_with_template_and_tool_parser(test_model_dir):
    path = test_model_dir / "tiny-llama"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    model, tok = load(str(path))
    assert tok.has_tool_calling and tok.tool_call_start == "<tool_call>"
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")}
    assert len(tok) == config["vocab_size"]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    text = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert (
        '"get_weather"' in text
        and '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    )
    assert "<|start_header_id|>tool<|end_header_id|>\n\nsunny<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # Text round-trips through the byte-level BPE.
    sample = 'Hello, wörld! {"a": [1, 2]} 🙂'
    assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample

    ids = tok.encode("The quick brown fox")
    assert ids[0] == tok.bos_token_id
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), config["vocab_size"])
    hidden = model.model(mx.array([ids]))
    assert hidden.shape == (1, len(ids), config["hidden_size"])
    # Special tokens carry zero lm_head rows: greedy decoding never picks them.
    special = [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|pad|>")]
    assert mx.all(logits[0, -1, mx.array(special)] == 0).item()
    assert mx.max(logits[0, -1]).item() > 0


def test_without_fim_tokens(tmp_path):
    path = write_test_model(tmp_path, "nofim", fim=False)
    vocab = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    assert not any(t["content"].startswith("<|fim") for t in vocab)


def test_context_and_ending_variants_leave_the_default_as_it_was(tmp_path):
    default = write_test_model(tmp_path / "d", "m")
    wide = write_test_model(tmp_path / "w", "m", context=65536)
    ending = write_test_model(tmp_path / "e", "m", ending=True)
    # A wider context: the same weights and tokenizer, a larger declared window.
    assert _digest(wide)["model.safetensors"] == _digest(default)["model.safetensors"]
    assert json.loads((wide / "config.json").read_text())["max_position_embeddings"] == 65536
    assert json.loads((wide / "tokenizer_config.json").read_text())["model_max_length"] == 65536
    # The ending variant differs in weights only, and ends its turns by itself.
    d, e = _digest(default), _digest(ending)
    assert d.pop("model.safetensors") != e.pop("model.safetensors") and d == e
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load(str(ending))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ended = 0
    for _ in range(8):
        last = None
        for last in stream_generate(model, tok, prompt, max_tokens=300, sampler=make_sampler(0.8)):
            pass
        ended += last.finish_reason == "stop"
    assert ended >= 5  # the default model runs to max_tokens (its end-of-turn row is zero)
