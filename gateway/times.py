"""Times on the wire: RFC 3339 timestamps and proto Durations."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from google.protobuf import duration_pb2


def rfc3339(dt: Optional[datetime] = None) -> str:
    """UTC, fractional seconds, 'Z' (the shape Ollama's created_at has)."""
    dt = (dt or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def time_of(msg: Any, name: str) -> str:
    """A proto Timestamp field as RFC 3339 (now when unset)."""
    if msg.HasField(name):
        return rfc3339(getattr(msg, name).ToDatetime(tzinfo=timezone.utc))
    return rfc3339()


def duration(seconds: Optional[float]) -> Optional[duration_pb2.Duration]:
    """Seconds (already normalised by the dialect: -1 = keep loaded) as a proto Duration."""
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d
