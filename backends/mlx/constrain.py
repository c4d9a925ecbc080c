"""JSON and JSON-schema output, enforced while decoding.

We use llguidance: its Earley parser plus derivative-based lexer computes a
full-vocabulary token mask in well under a millisecond, it implements JSON
schema broadly (refs, anyOf, patterns, min/max lengths), it is maintained by
Microsoft's guidance team and used by llama.cpp and vLLM, and it ships MLX
helpers.  (Its MLX mask kernel is Metal-only, so the mask is applied here
with plain MLX ops, which run on CPU and GPU alike.)

A constraint is a per-sequence logits processor.  BatchGenerator calls it
with the sequence's tokens so far (prompt included); it feeds the newly
sampled token to the matcher, then masks every token the grammar forbids.
Once the grammar is complete only EOS remains allowed, so the sequence ends
with finish "stop".
"""

from __future__ import annotations

import json
import threading
from typing import Optional

from backends.errors import InvalidArgument
from backends.types import OutputFormat

#: Bounded whitespace between JSON tokens: real models like pretty JSON, but a
#: model stuck emitting newlines must not run until max_tokens.
_JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,12}"}


class GrammarError(RuntimeError):
    """The matcher rejected a token it had allowed (a bug, not a user error)."""


def grammar_for(fmt: OutputFormat) -> Optional[str]:
    """The llguidance grammar for an output format, or None for plain text."""
    import llguidance

    if fmt.kind == "text":
        return None
    schema = {"type": "object"} if fmt.kind == "json" else fmt.schema
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"format: invalid JSON schema: {e}") from None


class TokenizerCache:
    """One llguidance tokenizer per loaded model: building it takes up to a second."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tok = None

    def get(self, hf_tokenizer, vocab_size: int, eos_ids: list[int]):
        with self._lock:
            if self._tok is None:
                import llguidance.hf

                self._tok = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
            return self._tok


def new_matcher(lltok, grammar: str):
    """Compile the grammar for one sequence; a schema llguidance cannot use is the caller's error."""
    import llguidance

    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    if matcher.is_error():
        raise InvalidArgument(f"format: unsupported JSON schema: {matcher.get_error()}")
    return matcher


class GrammarProcessor:
    """Logits processor applying one matcher's mask (MLX thread only)."""

    def __init__(self, matcher, prompt_len: int, vocab_size: int) -> None:
        self._matcher = matcher
        self._seen = prompt_len
        self._vocab = vocab_size

    @property
    def done(self) -> bool:
        return self._matcher.is_stopped()

    def __call__(self, tokens, logits):
        import mlx.core as mx
        import numpy as np

        n = tokens.shape[0]
        if n > self._seen:
            new = tokens[self._seen :].tolist()
            self._seen = n
            # BatchGenerator runs one step past the EOS that ends the sequence;
            # a finished grammar has nothing to consume.
            if self._matcher.is_stopped():
                new = []
            if new and not self._matcher.consume_tokens(new):
                raise GrammarError(f"grammar rejected tokens {new}: {self._matcher.get_error()}")
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")
        width = logits.shape[-1]
        if allowed.shape[0] < width:
            allowed = np.concatenate([allowed, np.zeros(width - allowed.shape[0], dtype=np.uint8)])
        allowed = mx.array(allowed[:width].astype(np.bool_))
        return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))
