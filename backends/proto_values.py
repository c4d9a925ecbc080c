"""The small proto conversions the types' codecs (``backends/types.py``) and
the accept step (``backends/accept.py``) share: the proto's enums as words,
keep-alive durations, timestamps, a caller's JSON object carried as text."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Optional

from google.protobuf import duration_pb2, timestamp_pb2

from backends.errors import InvalidArgument
from mlxgate import limits
from mlxgate.dialects.base import caller_arguments
from mlxgate.jsonutil import JSONError
from mlxgate.v1 import inference_pb2 as pb

ROLE_TO_PB = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
ROLE_OF_PB = {v: k for k, v in ROLE_TO_PB.items()}
#: An image's detail (OpenAI's image_url.detail; "auto" is the proto's UNSPECIFIED).
DETAIL_TO_PB = {"auto": pb.IMAGE_DETAIL_UNSPECIFIED, "low": pb.IMAGE_DETAIL_LOW, "high": pb.IMAGE_DETAIL_HIGH}
DETAIL_OF_PB = {v: k for k, v in DETAIL_TO_PB.items()}

FINISH_TO_PB = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "error": pb.FINISH_REASON_ERROR,
}
FINISH_OF_PB = {v: k for k, v in FINISH_TO_PB.items()}

CAPABILITIES = ("completion", "tools", "embedding", "insert", "vision", "thinking")
CAPABILITY_TO_PB = {
    "completion": pb.CAPABILITY_COMPLETION,
    "tools": pb.CAPABILITY_TOOLS,
    "embedding": pb.CAPABILITY_EMBEDDING,
    "insert": pb.CAPABILITY_INSERT,
    "vision": pb.CAPABILITY_VISION,
    "thinking": pb.CAPABILITY_THINKING,
}
CAPABILITY_OF_PB = {v: k for k, v in CAPABILITY_TO_PB.items()}


#: Longer than this means "keep loaded" (limits.py).
KEEP_ALIVE_FOREVER_S = limits.KEEP_ALIVE_FOREVER_S


def normalize_keep_alive(seconds: Optional[float]) -> Optional[float]:
    """None stays None (the default); negative or beyond ~290 years is -1 (keep loaded)."""
    if seconds is None:
        return None
    if math.isnan(seconds):
        raise InvalidArgument("keep_alive: not a number")
    return -1.0 if seconds < 0 or seconds > KEEP_ALIVE_FOREVER_S else float(seconds)


def keep_alive_from_pb(msg: pb.GenerateRequest | pb.EmbedRequest | pb.LoadModelRequest) -> Optional[float]:
    """Seconds, or None when the caller left keep_alive unset."""
    if not msg.HasField("keep_alive"):
        return None
    return normalize_keep_alive(msg.keep_alive.seconds + msg.keep_alive.nanos / 1e9)


def keep_alive_to_pb(seconds: Optional[float]) -> Optional[duration_pb2.Duration]:
    """The Duration ``keep_alive_from_pb`` reads back (None: leave it unset)."""
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def timestamp_to_pb(dt: Optional[datetime]) -> Optional[timestamp_pb2.Timestamp]:
    if dt is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(dt.astimezone(timezone.utc))
    return t


def caller_json_object(text: str, field_name: str) -> dict:
    """A JSON object sent as text by a caller (the caller rule of
    ``mlxgate.dialects.base``): bad, deep or non-object JSON is INVALID_ARGUMENT, named."""
    try:
        return caller_arguments(text, field_name)
    except JSONError as e:
        raise InvalidArgument(str(e)) from None
