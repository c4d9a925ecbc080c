"""Embeddings from a generative model: mean-pooled final hidden states, L2-normalised.

mlx-lm models keep their transformer body (embedding, layers, final norm) in
an inner module, ``model.model`` for Llama-likes; calling it without the LM
head gives the normalised hidden states.  ``hidden_states_module`` looks in
the usual places so other families work too.
"""

from __future__ import annotations

from typing import Any

from backends.errors import InvalidArgument


def tokenize_inputs(
    counter, tokenizer, inputs: list[str], context_length: int, truncate: bool, model: str
) -> list[list[int]]:
    """Token ids per input (worker thread); too long → cut when truncate, else InvalidArgument.

    Bounded: an input is tokenized only as far as the context reaches
    (``TokenCounter``), so a 10 MB input costs what a context-sized one does.
    """
    out = []
    for i, text in enumerate(inputs):
        if not text:
            raise InvalidArgument(f"input[{i}]: empty input")
        c = counter.count(text, context_length + 1)
        if c.lower > context_length:
            if not truncate:
                raise InvalidArgument(
                    f"input[{i}]: at least {c.lower} tokens exceed {model}'s context length {context_length} "
                    "and truncate is false"
                )
            text = counter.head(text, context_length)
        out.append(_fit(list(tokenizer.encode(text)), i, context_length, truncate, model))
    return out


def _fit(ids: list[int], i: int, context_length: int, truncate: bool, model: str) -> list[int]:
    """``ids`` within the context: cut to it with ``truncate``, else refused."""
    if len(ids) > context_length:
        if not truncate:
            raise InvalidArgument(
                f"input[{i}]: {len(ids)} tokens exceed {model}'s context length {context_length} "
                "and truncate is false"
            )
        return ids[:context_length]
    return ids


def token_inputs(
    inputs: list[list[int]], vocab_size: int, context_length: int, truncate: bool, model: str
) -> list[list[int]]:
    """Token-id inputs, checked: every id in the vocabulary, lengths by the same rule as text.

    The ids are used as given (no special tokens added), so ids a client got
    from this model's tokenizer embed exactly like the text they encode.
    """
    out = []
    for i, ids in enumerate(inputs):
        if not ids:
            raise InvalidArgument(f"input[{i}]: empty input")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                f"input[{i}]: token id {bad} is not in {model}'s vocabulary (0 to {vocab_size - 1}); "
                "token ids must come from this model's own tokenizer"
            )
        out.append(_fit(list(ids), i, context_length, truncate, model))
    return out


def hidden_states_module(model) -> Any:
    for path in ("model", "language_model.model", "backbone", "transformer"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and callable(obj):
            return obj
    return None


def embed_one(model, ids: list[int], dimensions: int) -> list[float]:
    """One vector for one token list (MLX thread only).

    One input per call: the backend submits inputs one by one, so decode
    steps of running generations interleave with a large embeddings request
    and a cancelled request stops between two inputs.
    """
    import mlx.core as mx

    body = hidden_states_module(model)
    if body is None:
        raise InvalidArgument("this model has no hidden-state module to embed with")
    h = body(mx.array([ids]))
    if isinstance(h, tuple):
        h = h[0]
    if h.ndim != 3:
        raise InvalidArgument(f"this model's hidden states have shape {h.shape}; cannot embed")
    v = h[0].astype(mx.float32).mean(axis=0)
    if dimensions:
        v = v[:dimensions]
    v = v / mx.maximum(mx.linalg.norm(v), 1e-12)
    return v.tolist()
