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

A forced tool call (tool_choice "required" or a named function) is a grammar
too: the model's tool-call markers around one call object whose name is one
of the allowed tools and whose arguments follow that tool's parameter schema,
then EOS.  That needs the exact text format the model's tool parser reads, so
it exists only for the parsers listed in ``TOOL_CALL_GRAMMARS``.
"""

from __future__ import annotations

import json
import threading
from typing import Optional, Sequence

from backends.errors import InvalidArgument
from backends.types import OutputFormat, Tool

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


#: mlx-lm tool parsers (``mlx_lm.tool_parsers.<name>``) whose call syntax we can
#: write as a grammar.  json_tools reads ``json.loads(body)`` between
#: ``<tool_call>`` and ``</tool_call>``: ``{"name": ..., "arguments": {...}}``.
TOOL_CALL_GRAMMARS = frozenset({"json_tools"})


def tool_parser_name(tokenizer) -> Optional[str]:
    """The mlx-lm tool parser module's short name (e.g. "json_tools"), or None."""
    parser = getattr(tokenizer, "tool_parser", None)
    module = getattr(parser, "__module__", None) or ""
    if not module.startswith("mlx_lm.tool_parsers."):
        return None
    return module.rsplit(".", 1)[-1]


def _lark_marker(text: str, ids: Optional[Sequence[int]]) -> str:
    """A marker as a lark item: its token when it is one token (special tokens
    must be generated as themselves), else its text."""
    if ids is not None and len(ids) == 1:
        return f"<[{int(ids[0])}]>"
    return json.dumps(text)


def _arguments_schema(tool: Tool) -> dict:
    schema = dict(tool.parameters) if isinstance(tool.parameters, dict) else {}
    if "type" not in schema and not any(k in schema for k in ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")):
        schema["type"] = "object"  # no schema: any object (the parser needs an object)
    schema["x-guidance"] = _JSON_OPTIONS
    return schema


def tool_call_grammar(
    tools: Sequence[Tool],
    start: str,
    end: str,
    start_ids: Optional[Sequence[int]] = None,
    end_ids: Optional[Sequence[int]] = None,
) -> str:
    """The lark grammar of exactly one json_tools call to one of ``tools``, then EOS.

    ``<tool_call>`` (optional newline) ``{"name": "<tool>", "arguments": <object
    matching the tool's parameters>}`` (optional newline) ``</tool_call>``.  Each
    tool is its own alternative with its own embedded schema, so a ``$ref``
    inside a parameters schema still resolves against that schema's root.
    """
    import llguidance

    if not tools:
        raise InvalidArgument("tool_choice: no tools to call")
    lines = [
        "%llguidance {}",
        f"start: LEAD? {_lark_marker(start, start_ids)} NL? call NL? {_lark_marker(end, end_ids)}",
        r'LEAD: /[ \t\n]{1,4}/',
        r'NL: "\n"',
        "call: " + " | ".join(f"call_{i}" for i in range(len(tools))),
    ]
    for i, tool in enumerate(tools):
        head = '{"name": ' + json.dumps(tool.name) + ', "arguments": '
        lines.append(f"call_{i}: {json.dumps(head)} %json {json.dumps(_arguments_schema(tool))} \"}}\"")
    return llguidance.LLMatcher.grammar_from_lark("\n".join(lines) + "\n")


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


def new_matcher(lltok, grammar: str, what: str = "format"):
    """Compile the grammar for one sequence; a schema llguidance cannot use is the caller's error."""
    import llguidance

    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    if matcher.is_error():
        raise InvalidArgument(f"{what}: unsupported JSON schema: {matcher.get_error()}")
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
