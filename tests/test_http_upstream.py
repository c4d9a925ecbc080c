"""Line framing shared by the Ollama (NDJSON) and cloud (SSE) adapters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from backends import http_upstream
from backends.errors import Unavailable


def response(*parts: bytes) -> SimpleNamespace:
    async def iter_any():
        for p in parts:
            yield p

    return SimpleNamespace(content=SimpleNamespace(iter_any=iter_any))


async def lines(resp) -> list[bytes]:
    return [line async for line in http_upstream.iter_lines(resp)]


async def test_lines_split_across_reads_and_crlf() -> None:
    assert await lines(response(b'{"a":', b'1}\r\n{"b"', b":2}\n\n", b"tail")) == [b'{"a":1}', b'{"b":2}', b"", b"tail"]


async def test_a_line_without_end_is_an_upstream_fault(monkeypatch) -> None:
    monkeypatch.setattr(http_upstream, "MAX_LINE_BYTES", 1000)
    with pytest.raises(Unavailable, match="exceeds 1000 bytes"):
        await lines(response(*([b"x" * 300] * 5)))
    # Long but complete lines under the limit are fine.
    assert await lines(response(b"y" * 900 + b"\n")) == [b"y" * 900]
