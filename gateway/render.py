"""JSON out: every answer body, stream line and error is rendered here, with orjson.

Answers are plain dicts shaped by the dialects' response ``TypedDict``s
(``mlxgate/dialects/``): nothing is validated per chunk.  orjson writes
compact JSON with non-ASCII kept as is (the bytes the front always sent).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import orjson
from aiohttp import web


def json_bytes(obj: Any) -> bytes:
    return orjson.dumps(obj)


def json_response(
    body: Any, status: int = 200, reason: Optional[str] = None, headers: Optional[Mapping[str, str]] = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, reason=reason, headers=headers, content_type="application/json",
        charset="utf-8",
    )
