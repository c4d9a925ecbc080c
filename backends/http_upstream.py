"""Shared plumbing for the HTTP adapters (upstream Ollama, cloud APIs).

One place turns an upstream HTTP failure into the ``BackendError`` the router
and the gRPC service understand, parses ``Retry-After``, splits a byte stream
into lines as they arrive, and scrubs secrets out of anything that could be
shown or logged.  Client side only: no aiohttp web server here.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import AsyncIterator, Iterable, Optional

import aiohttp

from backends.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

#: Longest upstream error text passed on to callers.
MAX_ERROR_TEXT = 500


def redact(text: str, secrets: Iterable[Optional[str]]) -> str:
    """Replace every secret (and its tail, which providers like to echo) with ***."""
    for s in secrets:
        if not s:
            continue
        text = text.replace(s, "***")
        # "Incorrect API key provided: sk-ab***********wxyz" style echoes: a
        # long enough tail of the key is a secret too.
        if len(s) >= 16:
            text = text.replace(s[-8:], "***")
    return text


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def error_text_from_body(body: bytes) -> str:
    """The message from an Ollama ``{"error": "..."}`` or OpenAI
    ``{"error": {"message": ...}}`` body, else the (trimmed) text itself."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:MAX_ERROR_TEXT]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or json.dumps(err)
        if err is not None:
            return str(err)[:MAX_ERROR_TEXT]
    return text[:MAX_ERROR_TEXT]


def error_for_status(
    who: str, status: int, message: str, retry_after: Optional[float] = None
) -> BackendError:
    """Map an upstream HTTP status onto a BackendError (DESIGN.md's table, reversed)."""
    msg = f"{who}: {message or f'HTTP {status}'}"
    if status == 400 or status == 413 or status == 422:
        return InvalidArgument(msg)
    if status == 401:
        return Unauthenticated(msg)
    if status == 403:
        return PermissionDenied(msg)
    if status == 404:
        return ModelNotFound(msg)
    if status == 408 or status == 504:
        return DeadlineExceeded(msg)
    if status == 429 or status == 503:
        return ResourceExhausted(msg, retry_after=retry_after)
    if status == 501:
        return Unimplemented(msg)
    if 400 <= status < 500:
        return InvalidArgument(msg)
    return Unavailable(msg)


async def raise_for_response(who: str, resp: aiohttp.ClientResponse, secrets: Iterable[Optional[str]] = ()) -> None:
    """Raise the matching BackendError when ``resp`` is not a 2xx."""
    if resp.status < 300:
        return
    try:
        body = await asyncio.wait_for(resp.content.read(64 * 1024), timeout=5.0)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        body = b""
    message = redact(error_text_from_body(body), secrets)
    if resp.status == 404 and not _is_json_error(body):
        # A bare 404 page: the endpoint itself is missing (e.g. a server with
        # no /embeddings), not the model.
        raise Unimplemented(f"{who}: {resp.method} {resp.url.path} is not served by the upstream")
    raise error_for_status(who, resp.status, message, parse_retry_after(resp.headers.get("Retry-After")))


def _is_json_error(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict)


def error_for_exception(who: str, exc: BaseException, secrets: Iterable[Optional[str]] = ()) -> BackendError:
    """Map an aiohttp/asyncio client failure onto a BackendError.

    The message names the failure kind, never headers (which hold keys)."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return DeadlineExceeded(f"{who}: upstream timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Unavailable(f"{who}: cannot connect to upstream ({redact(str(exc.os_error), secrets)})")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Unavailable(f"{who}: upstream closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Unavailable(f"{who}: upstream response was cut off")
    if isinstance(exc, aiohttp.ClientError):
        return Unavailable(f"{who}: upstream request failed ({type(exc).__name__})")
    if isinstance(exc, OSError):
        return Unavailable(f"{who}: upstream connection failed ({type(exc).__name__})")
    return Unavailable(f"{who}: upstream request failed ({type(exc).__name__})")


#: Longest line an upstream may send (one NDJSON object or SSE field).
MAX_LINE_BYTES = 16 * 1024 * 1024


async def iter_lines(resp: aiohttp.ClientResponse, who: str = "upstream") -> AsyncIterator[bytes]:
    """Yield each line of the body (without its newline) as soon as it is complete.

    Reads whatever bytes have arrived (no buffering of the whole body); a final
    line without a newline is yielded at EOF.  A line over MAX_LINE_BYTES is
    an upstream fault (Unavailable), not a reason to grow without bound."""
    buf = bytearray()
    async for data in resp.content.iter_any():
        start = len(buf)
        buf += data
        while True:
            i = buf.find(b"\n", start)
            if i < 0:
                break
            yield bytes(buf[:i]).rstrip(b"\r")
            del buf[: i + 1]
            start = 0
        if len(buf) > MAX_LINE_BYTES:
            raise Unavailable(f"{who}: a line of the response exceeds {MAX_LINE_BYTES} bytes")
    if buf.strip():
        yield bytes(buf).rstrip(b"\r")


class UpstreamSession:
    """A lazily created aiohttp session (a ClientSession belongs to the running
    event loop, so it cannot be made in __init__), closed by ``close``."""

    _session: Optional[aiohttp.ClientSession] = None

    def _session_with(self, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def client_timeout(total: Optional[float], connect: Optional[float], read: Optional[float]) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total, sock_connect=connect, connect=connect, sock_read=read)
