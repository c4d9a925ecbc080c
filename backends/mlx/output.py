"""Turning one sequence's sampled tokens into Chunks.

Per token: streaming detokenize, hold back text that could begin a stop
string, split out thinking (reasoning) and then tool-call sections, and attach the token ids (and
logprobs) to the next chunk that carries something.  Pure Python, no MLX, so
it is tested on its own with plain token lists.
"""

from __future__ import annotations

from typing import Optional

from backends.types import Chunk, TokenLogprob, ToolCall
from backends.mlx.thinking import ThinkSplitter
from backends.mlx.toolcalls import ToolCallSplitter, partial_suffix_len


class StopStrings:
    """Finds the first stop string in a growing text; emits only text known to precede it."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._sent = 0
        #: The stop string that was reached (the earliest in the text; on a tie, the first listed).
        self.matched = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return delta, False
        self._text += delta
        start = max(0, self._sent - self._longest + 1)
        hits = [(i, s) for i, s in ((self._text.find(s, start), s) for s in self._stops) if i >= 0]
        if hits:
            first, self.matched = min(hits, key=lambda hit: hit[0])
            cut = max(first, self._sent)
            out = self._text[self._sent : cut]
            self._sent = len(self._text)
            return out, True
        pending = self._text[self._sent :]
        keep = max(partial_suffix_len(pending, s) for s in self._stops)
        end = len(self._text) - keep
        out = self._text[self._sent : end]
        self._sent = end
        # Only the tail can still matter; keep the buffer short.
        if self._sent > 4 * self._longest + 256:
            drop = self._sent - self._longest
            self._text = self._text[drop:]
            self._sent -= drop
        return out, False

    def flush(self) -> str:
        out = self._text[self._sent :]
        self._sent = len(self._text)
        return out


class SequenceOutput:
    """All per-sequence text state; ``add`` one token at a time, then ``finish``."""

    def __init__(
        self,
        detokenizer,
        eos_token_ids: set[int],
        stops: list[str],
        splitter: Optional[ToolCallSplitter] = None,
        thinking: Optional[ThinkSplitter] = None,
    ) -> None:
        """Stop strings apply to everything generated (thinking included);
        tool calls are looked for in the answer text only."""
        self._detok = detokenizer
        self._eos = eos_token_ids
        self._stops = StopStrings(stops)
        self._splitter = splitter
        self._thinking = thinking
        self._ids: list[int] = []
        self._lps: list[TokenLogprob] = []
        self.completion_tokens = 0
        self.stopped_by_string = False
        self._finished = False

    @property
    def stop_sequence(self) -> str:
        """The stop string that ended the sequence ("" when none did)."""
        return self._stops.matched if self.stopped_by_string else ""

    @property
    def tool_calls_emitted(self) -> int:
        return self._splitter.calls if self._splitter else 0

    def add(self, token: int, logprob: Optional[TokenLogprob] = None) -> tuple[list[Chunk], bool]:
        """Consume one sampled token: (chunks to send, whether the sequence must stop).

        EOS tokens end the sequence and are neither emitted nor counted.
        """
        if token in self._eos:
            return self.finish(), True
        self.completion_tokens += 1
        self._ids.append(token)
        if logprob is not None:
            self._lps.append(logprob)
        self._detok.add_token(token)
        text, stopped = self._stops.feed(self._detok.last_segment)
        if stopped:
            self.stopped_by_string = True
            return self._emit(text, final=True), True
        return self._emit(text), False

    def finish(self) -> list[Chunk]:
        """Flush whatever is held back (end of generation for any reason)."""
        if self._finished:
            return []
        self._detok.finalize()
        text, stopped = self._stops.feed(self._detok.last_segment)
        if stopped:
            self.stopped_by_string = True
        else:
            text += self._stops.flush()
        return self._emit(text, final=True)

    def _emit(self, text: str, final: bool = False) -> list[Chunk]:
        thinking = ""
        if self._thinking is not None:
            thinking, text = self._thinking.feed(text)
            if final:
                more_thinking, more_text = self._thinking.finish()
                thinking += more_thinking
                text += more_text
        pieces: list = self._splitter.feed(text) if self._splitter else ([text] if text else [])
        if final:
            self._finished = True
            if self._splitter:
                pieces += self._splitter.finish()
        out_text = "".join(p for p in pieces if isinstance(p, str))
        calls = [p for p in pieces if isinstance(p, ToolCall)]
        if not out_text and not thinking and not calls and not (final and self._ids):
            return []
        chunk = Chunk(
            text=out_text, thinking=thinking, token_ids=self._ids, tool_calls=calls, logprobs=self._lps
        )
        self._ids, self._lps = [], []
        return [chunk]
