"""Reading JSON request bodies, bounded.

``read_json`` gives the body as a dict or a 400 that says what is wrong:
invalid Unicode (lone surrogates), nesting beyond ``MAX_JSON_DEPTH`` and
malformed JSON are all a 400, never a 500 (``mlxgate/jsonutil.py``); a body
that does not arrive within ``http_body_timeout`` is a 408.  The dict is
then parsed once by its dialect model (``gateway.common.parse``), which
checks types and the dialect's rules and names the field at fault.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.errors import ApiError, bad_request
from gateway.state import SERVER_CONFIG_KEY
from mlxgate import jsonutil


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong;
    a 408 when it does not arrive within ``http_body_timeout`` seconds."""
    limit = request.app[SERVER_CONFIG_KEY].http_body_timeout
    try:
        async with asyncio.timeout(limit):
            raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    except TimeoutError:
        raise ApiError(408, f"request body not received within {limit:g} s") from None
    if not raw.strip():
        raise bad_request("missing request body")
    try:
        data = jsonutil.loads(raw, "request body")
    except jsonutil.JSONError as e:
        raise bad_request(f"invalid JSON in request body: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    return data
