"""Streaming split of generated text into plain text and tool-call sections.

The markers (e.g. ``<tool_call>``/``</tool_call>``) and the parser come from
the tokenizer (mlx-lm infers them from the chat template or
``tool_parser_type``), so every model family mlx-lm knows works the same way.
Text that could be the start of a marker is held back until it is known not
to be one, so a client never sees half a marker.

Markup never becomes content because of where a generation stops: a call the
generation ends inside of (``max_tokens`` or the context reached, EOS before
the end marker) is parsed if its body is already a whole call, and otherwise
dropped and counted in ``unfinished`` -- the answer then has no call and no
markup, and the finish reason ("length") says why.  A *closed* call the parser
cannot read is still passed on as text, as Ollama and vLLM do: the model
finished it, and dropping a whole answer would hide what it said.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Callable, Optional, Union

from backends.types import ToolCall

log = logging.getLogger(__name__)

Piece = Union[str, ToolCall]


def partial_suffix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def to_tool_calls(parsed: Any, first_index: int) -> list[ToolCall]:
    """Normalise a parser's result (dict or list of dicts) into ToolCalls."""
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"tool call without a name: {item!r}")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        if not isinstance(args, dict):
            raise ValueError(f"tool call arguments are not an object: {args!r}")
        calls.append(
            ToolCall(
                name=item["name"],
                arguments=args,
                id=str(item.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
                index=first_index + i,
            )
        )
    return calls


class ToolCallSplitter:
    """Feed text deltas; get back text pieces and parsed ToolCalls in order."""

    def __init__(
        self,
        start: str,
        end: Optional[str],
        parser: Callable[[str, Any], Any],
        tools: Optional[list[dict]] = None,
        forced: bool = False,
    ) -> None:
        """``forced``: a grammar makes the answer exactly one call (tool_choice
        "required" or a named function), so the only text outside it is the
        whitespace the grammar allows around the markers; that is not content
        and is dropped."""
        self._start = start
        self._end = end or ""
        self._parser = parser
        self._tools = tools
        self._forced = forced
        self._in_call = False
        self._buf = ""
        self.calls = 0
        #: Calls the generation ended inside of, too short to parse: dropped.
        self.unfinished = 0

    def _calls(self, body: str) -> Optional[list[ToolCall]]:
        """The calls in one call body, or None when the parser cannot read it."""
        try:
            calls = to_tool_calls(self._parser(body, self._tools), self.calls)
        except Exception as e:  # noqa: BLE001 - any parser failure means "not a tool call"
            log.debug("tool-call body not parsed (%s: %s)", type(e).__name__, e)
            return None
        self.calls += len(calls)
        return calls

    def _parse(self, body: str) -> list[Piece]:
        """A closed call: its calls, or (unreadable) the markup as the model wrote it."""
        calls = self._calls(body)
        if calls is None:
            log.warning("could not parse a tool call; passing it on as text")
            return [self._start + body + self._end]
        return list(calls)

    def _text(self, out: list[Piece], text: str) -> None:
        if text and not (self._forced and not text.strip()):
            out.append(text)

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while True:
            if not self._in_call:
                i = self._buf.find(self._start)
                if i < 0:
                    keep = partial_suffix_len(self._buf, self._start)
                    self._text(out, self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return out
                self._text(out, self._buf[:i])
                self._buf = self._buf[i + len(self._start) :]
                self._in_call = True
            else:
                if not self._end:
                    return out  # the call runs to the end of the generation
                j = self._buf.find(self._end)
                if j < 0:
                    return out
                body = self._buf[:j]
                self._buf = self._buf[j + len(self._end) :]
                self._in_call = False
                out.extend(self._parse(body))

    def finish(self) -> list[Piece]:
        """Flush at the end of the generation.

        A call still open is parsed if its body is whole (formats without an
        end marker end this way; so does a call cut just before its end
        marker); otherwise it was cut short and is dropped, never passed on as
        markup.
        """
        buf, self._buf = self._buf, ""
        out: list[Piece] = []
        if not self._in_call:
            self._text(out, buf)
            return out
        self._in_call = False
        calls = self._calls(buf) if buf.strip() else None
        if calls is None:
            self.unfinished += 1
            log.info("the generation ended inside a tool call (%d characters of it); the call is dropped", len(buf))
            return out
        return list(calls)
