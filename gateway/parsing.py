"""Reading a request: its JSON body and query string, bounded, as its dialect model.

``read_json`` gives the body as a dict or a 400 that says what is wrong:
invalid Unicode (lone surrogates), nesting beyond ``MAX_JSON_DEPTH`` and
malformed JSON are all a 400, never a 500 (``mlxgate/jsonutil.py``); a body
that does not arrive within ``http_body_timeout`` is a 408.  ``parse`` then
reads the dict once with its dialect model (``mlxgate/dialects/``), which
checks types and the dialect's rules and names the field at fault;
``read_query`` does the same for a query string.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.errors import ApiError, bad_request
from gateway.state import SERVER_CONFIG_KEY
from mlxgate import jsonutil
from mlxgate.dialects.base import log_unknown, wire_error

M = TypeVar("M", bound=BaseModel)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong;
    a 408 when it does not arrive within ``http_body_timeout`` seconds."""
    if request.content.is_eof():
        # The whole body came with the headers (nearly every request): nothing to wait for, no timer.
        raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    else:
        limit = request.app[SERVER_CONFIG_KEY].http_body_timeout
        try:
            async with asyncio.timeout(limit):
                raw = await request.read()
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


def parse(model: type[M], data: dict[str, Any], route: str) -> M:
    """A request body (already bounded JSON: ``read_json``) as its dialect
    model; a 400 naming the first bad field otherwise.  Unknown fields are
    kept and logged once per name."""
    try:
        parsed = model.model_validate(data)
    except ValidationError as e:
        err = wire_error(e, data)
        raise bad_request(err.message, param=err.path or None) from None
    log_unknown(parsed, route)
    return parsed


_INTEGER = re.compile(r"^-?[0-9]{1,20}$")


def read_query(request: Any, model: type[M], route: str, integers: tuple[str, ...] = ("limit",)) -> M:
    """A query string as its dialect model: only the model's own parameters
    are read (others are ignored, as the APIs ignore them), ``integers`` as
    integers when they are one; a 400 naming the bad parameter otherwise."""
    data: dict[str, Any] = {}
    for name in model.model_fields:
        value = request.query.get(name)
        if value is not None:
            data[name] = int(value) if name in integers and _INTEGER.match(value) else value
    return parse(model, data, route)
