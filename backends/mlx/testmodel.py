"""A tiny Llama-shaped mlx-lm model the project writes itself.

There is no model hub on a test box, so tests and the demo need a model that
can be made from nothing: a byte-level BPE tokenizer trained on text embedded
here (deterministic, unlike files found on disk), a Llama-3-like chat template
with tool support that mlx-lm's ``json_tools`` parser recognises, and random
weights drawn from ``seed``.  It loads through ``mlx_lm.utils.load`` exactly
like a real checkpoint, so every code path the engine runs is the real one.

Random weights produce gibberish, on purpose cheaply: the ``lm_head`` rows of
special tokens are zero, so greedy decoding never picks them by accident and
sampling rarely does, while a grammar mask that leaves only EOS still ends a
sequence.

Run ``python -m backends.mlx.testmodel DIR`` to write one by hand.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]
FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
# Not special (Qwen's convention): they decode as text, the engine splits them out.
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
# Reasoning markers, also plain text (Qwen3's convention); their presence is
# what makes mlx-lm's tokenizer wrapper report has_thinking.
THINK_TOKENS = ["<think>", "</think>"]
# Added (non-special) tokens: decoded as text.
TEXT_TOKENS = TOOL_TOKENS + THINK_TOKENS

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
CONTEXT = 2048
VOCAB_TARGET = 768

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set system_message = messages[0].content %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if system_message or tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message }}"
    "{%- if tools %}"
    "{%- if system_message %}{{- '\\n\\n' }}{%- endif %}"
    "{{- 'You can call these tools:\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    '{{- \'To call one, answer with <tool_call>{"name": <tool name>, "arguments": <arguments object>}'
    "</tool_call>' }}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message.role == 'tool' %}"
    "{{- '<|start_header_id|>tool<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' + (message.content or '') }}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'<tool_call>{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    # Qwen3's switch: thinking off pre-fills an empty think block; otherwise
    # the model decides (this one never thinks unless made to).
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Training text for the tokenizer: prose, chat turns, JSON and code, so the
# merges cover what tests send.  Embedded (not read from disk) to stay
# identical on every machine.
CORPUS = """\
The quick brown fox jumps over the lazy dog. Why is the sky blue? Because air scatters blue light more.
Hello! How are you today? I am fine, thank you. What is the weather like in Paris and in Berlin?
Tell me a story about a small robot who wanted to learn to paint the sea at night.
Once upon a time there was a model that lived on a Mac Studio and answered questions for its owner.
Please summarise the following text in one sentence. Translate this into French and German.
The answer is 42. Count from one to ten: one, two, three, four, five, six, seven, eight, nine, ten.
You are a helpful assistant. Answer briefly and truthfully. If you do not know, say so.
system user assistant tool function arguments name description parameters properties required type
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]}
{"id": 1, "title": "hello world", "done": false, "tags": ["a", "b"], "score": 3.5, "owner": null}
[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 100, 1000, 2048, 4096]
def add(a, b):
    return a + b

class Greeter:
    def __init__(self, name: str) -> None:
        self.name = name

    def greet(self) -> str:
        return f"Hello, {self.name}!"

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

import json, os, sys
with open("data.json") as f:
    data = json.load(f)
The function returns a list of strings. Each string is a line of the file without its newline.
Errors are reported with a clear message: model not found, context length exceeded, invalid argument.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June
red green blue yellow orange purple black white cat dog bird fish tree house water fire earth
"""


def _corpus() -> list[str]:
    lines = [ln for ln in CORPUS.splitlines() if ln.strip()]
    # A few repetitions give the frequent pairs enough weight for stable merges.
    return lines * 4


def build_tokenizer(*, fim: bool = True):
    """Train the byte-level BPE tokenizer (deterministic for a given corpus)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + (FIM_TOKENS if fim else [])
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


@dataclass(frozen=True)
class ModelSize:
    """Shape of the generated model: "tiny" for tests, "bench" for benchmarks
    big enough that matmuls, not Python overhead, dominate."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    dtype: str = "float32"


SIZES = {
    "tiny": ModelSize(HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE),
    # ~90M parameters.
    "bench": ModelSize(1024, 8, 16, 4, 2816),
    "bench-bf16": ModelSize(1024, 8, 16, 4, 2816, dtype="bfloat16"),
    # Heads 64 wide, as most real models', so a KV cache can be quantized in
    # mlx's groups of 64 (the "tiny" model's 16 cannot); as quick as "tiny".
    "tiny-wide-heads": ModelSize(128, 2, 2, 1, 256),
}


def _rows(shape: tuple, key, late: int):
    """Standard normal (vocab, hidden) matrix whose first rows do not depend on ``late``."""
    import mlx.core as mx

    first = mx.random.normal((shape[0] - late, shape[1]), key=key)
    if not late:
        return first
    return mx.concatenate([first, mx.random.normal((late, shape[1]), key=mx.random.split(key, 2)[1])])


def _random_weights(
    config: dict, seed: int, special_ids: list[int], dtype: str = "float32", late_rows: int = 0
) -> dict:
    """Weights for mlx-lm's llama (or qwen2) Model, named by the model class itself.

    The last ``late_rows`` vocabulary rows (tokens added after the first
    release of this model) are drawn apart, so adding them left every other
    weight, and so the gibberish tests have seen, unchanged.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama, qwen2

    arch = qwen2 if config["model_type"] == "qwen2" else llama
    model = arch.Model(arch.ModelArgs.from_dict(config))
    names = sorted(k for k, _ in tree_flatten(model.parameters()))
    shapes = dict(tree_flatten(model.parameters()))
    key = mx.random.key(seed)
    keys = mx.random.split(key, len(names))
    weights = {}
    for i, name in enumerate(names):
        shape = shapes[name].shape
        if name.endswith("norm.weight"):
            w = mx.ones(shape, dtype=mx.float32)
        elif name.endswith("embed_tokens.weight"):
            w = _rows(shape, keys[i], late_rows)
        elif name == "lm_head.weight":
            # Logits with a spread of a few nats: peaked enough that seeds matter.
            w = _rows(shape, keys[i], late_rows) * (3.0 / shape[1] ** 0.5)
            keep = mx.ones((shape[0], 1))
            keep[mx.array(special_ids)] = 0.0
            w = w * keep
        else:
            w = mx.random.normal(shape, key=keys[i]) * (1.0 / shape[-1] ** 0.5)
        weights[name] = w.astype(getattr(mx, dtype))
    mx.eval(weights)
    return weights


#: ``ending``: every token embedding gets this much along the first hidden
#: dimension, so the residual stream always carries it ...
ENDING_OFFSET = 4.0
#: ... and the end-of-turn row of ``lm_head`` reads it with this weight: the
#: end of turn is then likely at every step (measured at the default
#: temperature: about half the answers end within a dozen tokens, a few run
#: past a hundred).
ENDING_WEIGHT = 3.0


def _make_ending(weights: dict, eot_id: int, dtype: str) -> None:
    """Let the random model end its turn by itself (see ``write_test_model``)."""
    import mlx.core as mx

    emb = weights["model.embed_tokens.weight"].astype(mx.float32)
    offset = mx.zeros(emb.shape)
    offset[:, 0] = ENDING_OFFSET
    weights["model.embed_tokens.weight"] = (emb + offset).astype(getattr(mx, dtype))
    head = weights["lm_head.weight"].astype(mx.float32)
    row = mx.zeros((head.shape[1],))
    row[0] = ENDING_WEIGHT
    head[eot_id] = row
    weights["lm_head.weight"] = head.astype(getattr(mx, dtype))
    mx.eval(weights)


def write_test_model(
    out_dir: Path, name: str = "tiny-llama", seed: int = 0, *, fim: bool = True, size: str = "tiny",
    context: int = CONTEXT, ending: bool = False, arch: str = "llama",
) -> Path:
    """Write ``out_dir/name/`` and return that folder.

    ``fim=False`` leaves out the fill-in-the-middle tokens, giving a model
    without the "insert" capability.  ``size`` is a key of ``SIZES``.
    ``context``: the context length it declares (the weights do not depend on
    it; RoPE has no parameters), for clients whose prompts are long, such as
    Claude Code's.  ``ending``: a variant that ends its turns by itself (the
    default model almost never picks the end-of-turn token), for clients that
    wait for the model to finish (Claude Code takes an answer cut by
    max_tokens for an error): its embeddings share a constant component that
    the end-of-turn row of ``lm_head`` reads (``_make_ending``).  ``arch``:
    "llama", or "qwen2" (the same shape with attention biases, a model type
    mlx-lm can split by layers: pipeline parallelism; written with a
    ``model.safetensors.index.json``, which pipelined loading reads).
    """
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be llama or qwen2, got {arch!r}")
    if context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    import mlx.core as mx

    dims = SIZES[size]
    path = Path(out_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(fim=fim)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + (FIM_TOKENS if fim else []) + TEXT_TOKENS}
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": dims.hidden,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads,
        "intermediate_size": dims.intermediate,
        "vocab_size": vocab_size,
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|eot_id|>"], ids["<|end_of_text|>"]],
        "torch_dtype": dims.dtype,
    }
    special_ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS + (FIM_TOKENS if fim else []) + TEXT_TOKENS]
    weights = _random_weights(config, seed, special_ids, dims.dtype, late_rows=len(THINK_TOKENS))
    if ending:
        _make_ending(weights, ids["<|eot_id|>"], dims.dtype)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    if arch == "qwen2":
        index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in sorted(weights)}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(path / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": t not in TEXT_TOKENS,
        }
        for t in ids
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|pad|>",
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
        "tool_parser_type": "json_tools",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|pad|>"})
    )
    generation_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "do_sample": True,
        "temperature": 0.7,
    }
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m backends.mlx.testmodel OUT_DIR [NAME] [SEED]", file=sys.stderr)
        return 2
    name = args[1] if len(args) > 1 else "tiny-llama"
    seed = int(args[2]) if len(args) > 2 else 0
    print(write_test_model(Path(args[0]), name, seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
