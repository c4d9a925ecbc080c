"""Reranking on the MLX engine: prompts and batches (worker thread), scores (MLX thread).

Two ways to score a document against a query, chosen per model
(``method_of``):

* ``yes_probability`` -- a causal language model judges each (query,
  document) pair with Qwen3-Reranker's prompt (its model card: a system
  line, then ``<Instruct>: ...\\n<Query>: ...\\n<Document>: ...``), and the
  score is P("yes") against P("no") from the logits at the last position.  A
  tokenizer with ChatML markers gets the card's exact text, so a
  Qwen3-Reranker gives its intended scores; any other model gets the same
  system and user messages through its own chat template, so any chat model
  can rerank.
* ``cosine`` -- an embedding model: the query and each document embedded as
  ``/api/embed`` embeds them (mean-pooled, L2-normalised hidden states), the
  score their cosine similarity mapped from [-1, 1] onto [0, 1].

Cost is bounded before any forward pass: every document is cut to fit the
context (its text first, with the bounded ``TokenCounter``, so a huge one is
never tokenized whole), and the tokens of all the documents together are at
most ``MAX_RERANK_TOKENS`` (the query counts with each, for a causal model).
Sequences go through the model in batches of at most ``BATCH_TOKENS``
padded tokens (longest first, so that similar lengths share a batch), one
engine call per batch, so running generations interleave and a cancelled
request stops between two batches.  A batch is prefill only: right-padded
(a causal model's real positions never see the padding), run in chunks of
``prefill_step_size`` with a KV cache when long, and only the positions
needed are kept (each row's last one, or its mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from backends.errors import InvalidArgument
from backends.mlx.embed import hidden_states_module
from mlxgate.limits import MAX_RERANK_TOKENS

Method = Literal["yes_probability", "cosine"]

#: Qwen3-Reranker's judging prompt (its model card), word for word.
SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: The card's text around a pair, for ChatML tokenizers (thinking left empty).
CHATML_PREFIX = "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n"
CHATML_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
#: Padded tokens (rows x longest row) in one forward pass, and rows at most.
BATCH_TOKENS = 8192
BATCH_ROWS = 64
#: Marks where the pair goes when a chat template renders the judging prompt.
_SLOT = "\u0000PAIR\u0000"
#: Files that mark an embedding model (sentence-transformers' configuration).
_EMBEDDING_MARKERS = ("config_sentence_transformers.json", "modules.json")


def method_of(name: str, path: Path) -> Method:
    """``cosine`` for an embedding model -- its folder carries
    sentence-transformers' configuration, or its name says "embed" -- and
    ``yes_probability`` for every other (causal) model."""
    if "embed" in name.lower() or any((path / m).exists() for m in _EMBEDDING_MARKERS):
        return "cosine"
    return "yes_probability"


def pair_text(instruction: str, query: str, document: str) -> str:
    """The user turn of the judging prompt (Qwen3-Reranker's ``format_instruction``)."""
    return f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"


def _token_id(tokenizer, word: str) -> int:
    """The id the model answers ``word`` with: its own vocabulary entry when
    there is one (Qwen3-Reranker's ``convert_tokens_to_ids``), else the first
    token of its encoding."""
    vocab = tokenizer.get_vocab()
    if word in vocab:
        return int(vocab[word])
    ids = list(tokenizer.encode(word, add_special_tokens=False))
    if not ids:
        raise InvalidArgument(f"this model's tokenizer cannot encode {word!r}; it cannot rerank")
    return int(ids[0])


@dataclass(frozen=True)
class Judge:
    """A causal model's judging prompt as token ids around each pair, and the answer ids."""

    prefix: list[int]
    suffix: list[int]
    yes: int
    no: int

    @classmethod
    def of(cls, tokenizer, model: str) -> "Judge":
        vocab = tokenizer.get_vocab()
        if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
            prefix, suffix = CHATML_PREFIX, CHATML_SUFFIX
        elif getattr(tokenizer, "has_chat_template", False):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _SLOT}]
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                     enable_thinking=False)
            except Exception as e:  # noqa: BLE001 - jinja raises many types
                raise InvalidArgument(f"{model}'s chat template cannot render the judging prompt: {e}") from None
            if text.count(_SLOT) != 1:
                raise InvalidArgument(f"{model}'s chat template does not keep the user's text; it cannot rerank")
            prefix, suffix = text.split(_SLOT)
        else:
            prefix, suffix = SYSTEM + "\n\n", "\n\nAnswer (yes or no): "
        yes, no = _token_id(tokenizer, "yes"), _token_id(tokenizer, "no")
        if yes == no:
            raise InvalidArgument(f"{model}'s tokenizer has no distinct tokens for yes and no; it cannot rerank")
        encode = tokenizer.encode
        return cls(list(encode(prefix, add_special_tokens=False)), list(encode(suffix, add_special_tokens=False)),
                   yes, no)


@dataclass
class Prepared:
    """A request's sequences, ready for the engine."""

    #: Causal: one sequence per document, less ``prefix``.  Cosine: the query's first, then the documents'.
    sequences: list[list[int]]
    #: Batches of indices into ``sequences``.
    batches: list[list[int]]
    #: Tokens processed (``prefix`` counted with every sequence, as a model without sharing would).
    total_tokens: int
    #: Causal: the tokens every sequence starts with (the judging prompt, the
    #: instruction and the query), evaluated once and shared by every row.
    prefix: list[int] = field(default_factory=list)


def _shared_prefix(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one of its own."""
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(0, n)


def _check_total(total: int) -> None:
    if total > MAX_RERANK_TOKENS:
        raise InvalidArgument(
            f"documents: more than {MAX_RERANK_TOKENS} tokens in all (each document with the query and the "
            f"judging prompt, after cutting to the context); send fewer or shorter documents"
        )


def judge_sequences(judge: Judge, counter, tokenizer, query: str, documents: list[str], instruction: str,
                    context_length: int, model: str) -> Prepared:
    """Token ids of each pair's judging prompt, each within the context (worker thread).

    The pair is tokenized whole, as Qwen3-Reranker's reference does, and cut
    at the end when too long (its ``truncation``), then the suffix follows,
    so the answer position is always there."""
    fixed = len(judge.prefix) + len(judge.suffix)
    head = pair_text(instruction, query, "")
    need = counter.count(head, context_length).lower
    if fixed + need + 1 > context_length:
        raise InvalidArgument(
            f"query: context length exceeded: the query, the instruction and the judging prompt take at least "
            f"{fixed + need} tokens, leaving no room for a document in {model}'s context length {context_length}"
        )
    room = context_length - fixed
    encode = tokenizer.encode
    out, total = [], 0
    for doc in documents:
        # A start of the document that surely fills the room, tokenized no further.
        doc = counter.head(doc, room)
        ids = list(encode(pair_text(instruction, query, doc), add_special_tokens=False))[:room]
        seq = judge.prefix + ids + judge.suffix
        total += len(seq)
        _check_total(total)
        out.append(seq)
    shared = _shared_prefix(out)
    rest = [seq[shared:] for seq in out]
    return Prepared(rest, batches(rest), total, out[0][:shared])


def embedding_sequences(counter, tokenizer, query: str, documents: list[str], context_length: int) -> Prepared:
    """The query's and each document's ids as ``/api/embed`` tokenizes them, cut to the context."""
    out, total = [], 0
    for text in [query, *documents]:
        text = counter.head(text, context_length)
        ids = list(tokenizer.encode(text))[:context_length]
        total += len(ids)
        _check_total(total)
        out.append(ids)
    return Prepared(out, batches(out), total)


def batches(sequences: list[list[int]], max_tokens: int = BATCH_TOKENS, max_rows: int = BATCH_ROWS) -> list[list[int]]:
    """Indices grouped longest first, each group at most ``max_tokens``
    padded tokens and ``max_rows`` rows (a sequence longer than
    ``max_tokens`` goes alone)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[list[int]] = []
    for i in order:
        # The group's longest sequence is its first one.
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * len(sequences[out[-1][0]]) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


# ---------------------------------------------------------------- MLX thread


def _padded(seqs: list[list[int]]):
    import mlx.core as mx

    width = max(len(s) for s in seqs)
    return mx.array([s + [0] * (width - len(s)) for s in seqs])


def _body(model):
    body = hidden_states_module(model)
    if body is None:
        raise InvalidArgument("this model has no hidden-state module; it cannot rerank")

    def run(tokens, **kw):
        h = body(tokens, **kw)
        return h[0] if isinstance(h, tuple) else h

    return run


def prefill(model, prefix: list[int], step: int) -> Optional[list[tuple[Any, Any]]]:
    """The KV cache of ``prefix`` (one row), as (keys, values) per layer; None
    when the model's cache is not a plain KV cache (sliding windows, state
    space layers), whose rows then each run the whole sequence."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    if not prefix or any(type(c) is not KVCache for c in cache):
        return None
    run = _body(model)
    x = mx.array([prefix])
    for start in range(0, len(prefix), step):
        mx.eval(run(x[:, start:start + step], cache=cache))
    states = [c.keys_and_values() for c in cache]
    mx.eval(states)
    return states


def _shared_cache(states: list[tuple[Any, Any]], rows: int) -> list[Any]:
    """A fresh cache holding the prefix ``states`` once per row."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    out = []
    for keys, values in states:
        c = KVCache()
        c.state = (mx.repeat(keys, rows, axis=0), mx.repeat(values, rows, axis=0), keys.shape[2])
        out.append(c)
    return out


def _hidden_chunks(model, x, step: int, cache: Optional[list[Any]] = None):
    """(start, hidden states) of ``x`` (B, L) in chunks of ``step`` positions,
    with a KV cache across chunks (``cache``: one that already holds a
    prefix); one piece when it is short and there is no cache."""
    import mlx.core as mx

    run = _body(model)
    width = x.shape[1]
    if width <= step and cache is None:
        yield 0, run(x)
        return
    from mlx_lm.models.cache import make_prompt_cache

    if cache is None:
        cache = make_prompt_cache(model)
    for start in range(0, width, step):
        h = run(x[:, start:start + step], cache=cache)
        mx.eval(h)
        yield start, h


def _head(model, h):
    """The language-model head applied to hidden states ``h`` (B, H)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        return head(h)
    body = hidden_states_module(model)
    embed = getattr(body, "embed_tokens", None)
    if embed is not None and hasattr(embed, "as_linear"):
        return embed.as_linear(h)
    raise InvalidArgument("this model has no language-model head to judge with; it cannot rerank")


def yes_scores(model, seqs: list[list[int]], yes: int, no: int, step: int,
               prefix: Optional[list[tuple[Any, Any]]] = None) -> list[float]:
    """P(yes) against P(no) at each sequence's last position (one batch);
    ``prefix``: the shared prefix's KV states (``prefill``) the sequences continue."""
    import mlx.core as mx

    x = _padded(seqs)
    last = [len(s) - 1 for s in seqs]
    rows: list[Any] = [None] * len(seqs)
    cache = _shared_cache(prefix, len(seqs)) if prefix is not None else None
    for start, h in _hidden_chunks(model, x, step, cache):
        end = start + h.shape[1]
        for r, pos in enumerate(last):
            if start <= pos < end:
                rows[r] = h[r, pos - start]
    logits = _head(model, mx.stack(rows)).astype(mx.float32)
    pair = mx.stack([logits[:, no], logits[:, yes]], axis=-1)
    p = mx.softmax(pair, axis=-1)[:, 1]
    return p.tolist()


def mean_embeddings(model, seqs: list[list[int]], step: int) -> list[list[float]]:
    """Mean-pooled, L2-normalised hidden states of each sequence (one batch),
    as ``embed.embed_one`` makes them, padding left out."""
    import mlx.core as mx

    x = _padded(seqs)
    lengths = mx.array([len(s) for s in seqs], dtype=mx.float32)
    sums: Optional[Any] = None
    for start, h in _hidden_chunks(model, x, step):
        pos = mx.arange(start, start + h.shape[1])
        mask = (pos[None, :] < lengths[:, None]).astype(mx.float32)[..., None]
        part = (h.astype(mx.float32) * mask).sum(axis=1)
        sums = part if sums is None else sums + part
    v = sums / lengths[:, None]
    v = v / mx.maximum(mx.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return v.tolist()


def cosine_scores(query: list[float], documents: list[list[float]]) -> list[float]:
    """Cosine similarity of unit vectors, mapped from [-1, 1] onto [0, 1]."""
    import mlx.core as mx

    sims = mx.array(documents, dtype=mx.float32) @ mx.array(query, dtype=mx.float32)
    return mx.clip((sims + 1.0) / 2.0, 0.0, 1.0).tolist()
