"""Bounded JSON parsing for everything that comes from a caller.

``orjson`` rejects invalid UTF-8 and lone surrogates (``"\\ud800"``) and stops at
1,024 levels of nesting instead of recursing until the interpreter gives up;
``check_depth`` then holds every document to ``MAX_JSON_DEPTH`` without
recursion.  Both the HTTP front (request bodies) and the inference service
(JSON carried as text in proto fields: schemas, tool parameters, tool-call
arguments) parse through ``loads``, so a hostile document is a clear error in
either place, never a RecursionError or a 500.

A leaf module: it imports nothing of the project but the limits.
"""

from __future__ import annotations

from typing import Any, Union

import orjson

from mlxgate.limits import MAX_JSON_DEPTH


class JSONError(ValueError):
    """Not JSON we accept: malformed, not valid Unicode, or nested too deeply."""


def depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value, counting up to ``limit + 1`` at most."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def check_depth(value: Any, what: str = "JSON", limit: int = MAX_JSON_DEPTH) -> None:
    if depth(value, limit) > limit:
        raise JSONError(f"{what} is nested more than {limit} levels deep")


def loads(data: Union[bytes, bytearray, memoryview, str], what: str = "JSON", limit: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``data``; raise JSONError naming ``what`` on anything we refuse."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        msg = str(e)
        if "depth limit" in msg:
            raise JSONError(f"{what} is nested more than {limit} levels deep") from None
        if "surrogate" in msg or "UTF-8" in msg:
            raise JSONError(f"{what} is not valid Unicode: {msg}") from None
        raise JSONError(f"{what} is not valid JSON: {msg}") from None
    # Nesting needs an opening bracket per level: text with fewer than ``limit``
    # of them cannot be too deep, and counting them is far cheaper than the walk.
    if not isinstance(data, (bytes, bytearray, str)) or _openings(data) > limit:
        check_depth(value, what, limit)
    return value


def _openings(data: Union[bytes, bytearray, str]) -> int:
    if isinstance(data, str):
        return data.count("{") + data.count("[")
    return data.count(b"{") + data.count(b"[")


def loads_object(text: str, what: str) -> dict:
    """JSON text that must hold an object (empty text is an empty object)."""
    if not text:
        return {}
    value = loads(text, what)
    if not isinstance(value, dict):
        raise JSONError(f"{what} must be a JSON object")
    return value


def dumps(value: Any) -> str:
    """Compact JSON text (non-ASCII kept as is)."""
    return orjson.dumps(value).decode()
