"""Streaming split of generated text into thinking and answer text.

Reasoning models (Qwen3, DeepSeek-R1, ...) wrap their reasoning in markers
such as ``<think>``/``</think>``; mlx-lm's tokenizer wrapper names them
(``think_start``/``think_end``).  Text between them goes to
``Chunk.thinking``, the rest stays text, and the markers themselves are never
emitted.  Text that could be the start of a marker is held back until it is
known not to be one, as with stop strings and tool calls.

Whitespace right after a marker (``<think>\\n``, ``</think>\\n\\n``) is
dropped, as Ollama does, so neither field starts with the template's newlines.
"""

from __future__ import annotations

from typing import Optional, Sequence

from backends.mlx.toolcalls import partial_suffix_len

#: Only this many prompt tokens at the end are looked at for an opened block.
PROMPT_TAIL_TOKENS = 8


def starts_in_thinking(prompt_ids: Sequence[int], start_ids: Sequence[int], end_ids: Sequence[int]) -> bool:
    """Whether the prompt's tail opens a think block the model is to continue.

    Templates such as DeepSeek-R1's or Qwen3-Thinking's end the generation
    prompt with ``<think>\\n``; generation then starts inside the block.  Only
    the tail counts, so a marker quoted earlier in the conversation does not.
    """
    if not start_ids or not end_ids:
        return False
    tail = list(prompt_ids[-(PROMPT_TAIL_TOKENS + len(start_ids)) :])
    last_start = _rfind(tail, list(start_ids))
    return last_start >= 0 and _rfind(tail[last_start:], list(end_ids)) < 0


def _rfind(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub), -1, -1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


class ThinkSplitter:
    """Feed text deltas; get back (thinking, text) safe to emit.

    ``keep_thinking=False`` drops the thinking (the request asked for none)
    while still keeping the markers and the reasoning out of the text.
    """

    def __init__(self, start: str, end: str, *, in_thinking: bool = False, keep_thinking: bool = True) -> None:
        self._start = start
        self._end = end
        self._inside = in_thinking
        self._keep = keep_thinking
        self._pending = ""
        # Drop leading whitespace of a section a marker opened (plain answers
        # from a model that did not think are left as they are).
        self._at_section_start = in_thinking

    @property
    def inside(self) -> bool:
        return self._inside

    def feed(self, delta: str) -> tuple[str, str]:
        return self._run(delta, final=False)

    def finish(self) -> tuple[str, str]:
        """Flush what is held back (a partial marker at the end is plain content)."""
        return self._run("", final=True)

    def _run(self, delta: str, final: bool) -> tuple[str, str]:
        buf = self._pending + delta
        thinking: list[str] = []
        text: list[str] = []
        while True:
            marker = self._end if self._inside else self._start
            i = buf.find(marker)
            if i >= 0:
                self._put(buf[:i], thinking, text)
                buf = buf[i + len(marker) :]
                self._inside = not self._inside
                self._at_section_start = True
                continue
            keep = 0 if final else partial_suffix_len(buf, marker)
            self._put(buf[: len(buf) - keep], thinking, text)
            self._pending = buf[len(buf) - keep :]
            break
        t = "".join(thinking)
        return (t if self._keep else ""), "".join(text)

    def _put(self, piece: str, thinking: list[str], text: list[str]) -> None:
        if self._at_section_start:
            piece = piece.lstrip()
            if not piece:
                return
            self._at_section_start = False
        (thinking if self._inside else text).append(piece)


def new_splitter(tokenizer, prompt_ids: Sequence[int], think: Optional[bool]) -> Optional[ThinkSplitter]:
    """A splitter for this tokenizer and prompt, or None for a model without thinking."""
    if not getattr(tokenizer, "has_thinking", False):
        return None
    start, end = tokenizer.think_start, tokenizer.think_end
    inside = starts_in_thinking(prompt_ids, tokenizer.think_start_tokens or (), tokenizer.think_end_tokens or ())
    return ThinkSplitter(start, end, in_thinking=inside, keep_thinking=think is not False)
