"""Tokenize and detokenize with a loaded model's own tokenizer (worker thread, no MLX).

A chat is rendered exactly as a generation renders it (``prompt.build_prompt``
through ``context.fit``, never truncating), so its count is the prompt_tokens
the same chat reports when generated.  Cost is bounded by the context: an
input beyond it is refused ("context length exceeded", vLLM's rule for
``/tokenize``) without tokenizing more of it than the context holds; ids to
decode are bounded by the contract (``MAX_DETOKENIZE_TOKENS``) and checked
against the vocabulary.
"""

from __future__ import annotations

import dataclasses

from backends.errors import InvalidArgument
from backends.mlx import prompt as prompt_mod
from backends.mlx.context import TokenCounter, context_error, fit
from backends.types import TokenizeRequest


def tokenize(req: TokenizeRequest, tokenizer, counter: TokenCounter, context_length: int, model: str) -> list[int]:
    """The ids of ``req``'s text, or of its chat rendered with the chat template."""
    if req.text is not None:
        c = counter.count(req.text, context_length + 1)
        if c.lower > context_length:
            raise context_error(c.lower, context_length, exact=False)
        ids = list(tokenizer.encode(req.text, add_special_tokens=req.add_special_tokens))
        if len(ids) > context_length:
            raise context_error(len(ids), context_length)
        return ids
    chat = dataclasses.replace(req.as_generate(), truncate=False)
    if not chat.messages:
        return []
    ids, _ = fit(chat, counter, context_length,
                 lambda r: prompt_mod.build_prompt(r, tokenizer, model, req.add_generation_prompt))
    return ids


def pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text (vLLM's ``token_strs``: the vocabulary entries)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return [str(p) for p in hf.convert_ids_to_tokens(ids)]


def detokenize(tokenizer, ids: list[int], vocab_size: int, model: str) -> str:
    """The text of ``ids``, special tokens kept; an id outside the vocabulary is refused, named."""
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise InvalidArgument(
                f"tokens[{i}]: token id {t} is not in {model}'s vocabulary (0 to {vocab_size - 1})"
            )
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    return hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
