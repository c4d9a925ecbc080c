"""Reading JSON request bodies: one place for type checks and their messages.

Both dialects parse leniently (unknown fields are ignored and logged at debug
level) but strictly on types: a field of the wrong type is a 400 naming the
field, in the caller's dialect.  ``Body`` wraps one JSON object; ``path`` is
the field's name in messages ("options.temperature", "messages[2].role").
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from typing import Any, Iterable, Optional

from aiohttp import web

from gateway.errors import ApiError, bad_request
from mlxgate import jsonutil

log = logging.getLogger(__name__)

_MISSING = object()


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong."""
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if not raw.strip():
        raise bad_request("missing request body")
    try:
        # Bounded: invalid Unicode (lone surrogates), nesting beyond
        # MAX_JSON_DEPTH and malformed JSON are all a 400, never a 500.
        data = jsonutil.loads(raw, "request body")
    except jsonutil.JSONError as e:
        raise bad_request(f"invalid JSON in request body: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    return data


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Body:
    """Typed access to one JSON object's fields; records which were read."""

    def __init__(self, data: dict[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix
        self._seen: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        self._seen.add(key)
        return self.data.get(key)

    def ignore(self, *keys: str) -> None:
        """Fields accepted but without meaning here."""
        for k in keys:
            if k in self.data:
                self._seen.add(k)
                log.debug("ignoring field %s", self.name(k))

    def log_unknown(self, where: str) -> None:
        for k in self.data:
            if k not in self._seen:
                log.debug("%s: ignoring unknown field %s", where, self.name(k))

    def _wrong(self, key: str, want: str, v: Any) -> ApiError:
        return bad_request(f"{self.name(key)} must be {want}, got {_type_name(v)}", param=self.name(key))

    def str(self, key: str, default: Optional[str] = None, *, required: bool = False) -> Optional[str]:
        v = self.raw(key)
        if v is None:
            if required:
                raise bad_request(f"{self.name(key)} is required", param=self.name(key))
            return default
        if not isinstance(v, str):
            raise self._wrong(key, "a string", v)
        if required and not v:
            raise bad_request(f"{self.name(key)} is required", param=self.name(key))
        return v

    def bool(self, key: str, default: Optional[bool] = None) -> Optional[bool]:
        v = self.raw(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._wrong(key, "a boolean", v)
        return v

    def int(
        self, key: str, default: Optional[int] = None, *, lo: int = INT32_MIN, hi: int = INT32_MAX
    ) -> Optional[int]:
        """An integer within [lo, hi]; by default what the contract's int32 fields hold."""
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._wrong(key, "an integer", v)
        if isinstance(v, float):
            if not v.is_integer():
                raise self._wrong(key, "an integer", v)
            v = int(v)
        self._range(key, v, lo, hi)
        return v

    def float(
        self, key: str, default: Optional[float] = None, *, lo: Optional[float] = None, hi: Optional[float] = None
    ) -> Optional[float]:
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._wrong(key, "a number", v)
        self._range(key, v, lo, hi)
        return float(v)

    def _range(self, key: str, v: float, lo: Optional[float], hi: Optional[float]) -> None:
        if lo is not None and hi is not None and not lo <= v <= hi:
            raise bad_request(f"{self.name(key)} must be between {lo} and {hi}, got {v}", param=self.name(key))
        if lo is not None and v < lo:
            raise bad_request(f"{self.name(key)} must be at least {lo}, got {v}", param=self.name(key))
        if hi is not None and v > hi:
            raise bad_request(f"{self.name(key)} must be at most {hi}, got {v}", param=self.name(key))

    def list(self, key: str) -> Optional[list[Any]]:
        v = self.raw(key)
        if v is None:
            return None
        if not isinstance(v, list):
            raise self._wrong(key, "an array", v)
        return v

    def obj(self, key: str) -> Optional["Body"]:
        v = self.raw(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self._wrong(key, "an object", v)
        return Body(v, f"{self.name(key)}.")

    def str_or_list(self, key: str) -> Optional[list[str]]:
        """A string or an array of strings (``stop``), as a list."""
        v = self.raw(key)
        if v is None:
            return None
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return list(v)
        raise self._wrong(key, "a string or an array of strings", v)


def item(v: Any, name: str) -> Body:
    """An array element that must be an object."""
    if not isinstance(v, dict):
        raise bad_request(f"{name} must be an object, got {_type_name(v)}", param=name)
    return Body(v, f"{name}.")


def b64_images(values: Optional[Iterable[Any]], name: str) -> list[bytes]:
    """Base64 images (Ollama's ``images``); a data: URL prefix is tolerated."""
    out: list[bytes] = []
    for i, v in enumerate(values or []):
        if not isinstance(v, str):
            raise bad_request(f"{name}[{i}] must be a base64 string, got {_type_name(v)}", param=name)
        if v.startswith("data:") and "," in v:
            v = v.split(",", 1)[1]
        try:
            out.append(base64.b64decode(v, validate=True))
        except (binascii.Error, ValueError):
            raise bad_request(f"{name}[{i}] is not valid base64", param=name) from None
    return out
