"""Streaming split of generated text into plain text and tool-call sections.

The markers (e.g. ``<tool_call>``/``</tool_call>``) and the parser come from
the tokenizer (mlx-lm infers them from the chat template or
``tool_parser_type``), so every model family mlx-lm knows works the same way.
Text that could be the start of a marker is held back until it is known not
to be one, so a client never sees half a marker.
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
    ) -> None:
        self._start = start
        self._end = end or ""
        self._parser = parser
        self._tools = tools
        self._in_call = False
        self._buf = ""
        self.calls = 0

    def _parse(self, body: str) -> list[Piece]:
        try:
            calls = to_tool_calls(self._parser(body, self._tools), self.calls)
        except Exception as e:  # noqa: BLE001 - any parser failure means "not a tool call"
            log.warning("could not parse a tool call (%s: %s); passing it on as text", type(e).__name__, e)
            return [self._start + body + self._end]
        self.calls += len(calls)
        return list(calls)

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while True:
            if not self._in_call:
                i = self._buf.find(self._start)
                if i < 0:
                    keep = partial_suffix_len(self._buf, self._start)
                    emit = self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep :]
                    if emit:
                        out.append(emit)
                    return out
                if i:
                    out.append(self._buf[:i])
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
        """Flush at the end of the generation; an unterminated call is parsed if it can be."""
        buf, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            if not buf.strip():
                return []
            pieces = self._parse(buf)
            if pieces and isinstance(pieces[0], str):
                return [self._start + buf]  # no end marker was generated; don't invent one
            return pieces
        return [buf] if buf else []
