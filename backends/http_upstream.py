"""Shared plumbing for the HTTP adapters (upstream Ollama, cloud APIs).

One place turns an upstream HTTP failure into the ``BackendError`` the router
and the gRPC service understand, parses ``Retry-After``, splits a byte stream
into lines as they arrive, scrubs secrets out of anything that could be
shown or logged, and runs the clocks that bound a hung upstream.
Client side only: no aiohttp web server here.

Timeouts (``UpstreamTimeouts``, per upstream):

* ``connect_timeout``: opening the connection (aiohttp's ``connect`` and
  ``sock_connect``; ``connect`` includes waiting for a free connection of the
  session's pool).
* ``first_token_timeout``: from sending a streamed request to its first token.
  The wait for the response headers counts against it.
* ``idle_timeout``: from one token to the next.

A *token* is what ``UpstreamStream.token`` is told about: the adapters call it
for a line whose parsed event carried text, thinking, a tool-call delta or
logprobs.  Headers, blank lines, SSE comments (``: keep-alive``), role-only
deltas, usage events and empty NDJSON objects are read but do not move the
deadline, so an upstream that only keeps the connection warm is still ended.
aiohttp's ``sock_read`` (reset by any byte) is deliberately not used.

A clock that runs out before the first token raises ``DeadlineExceeded``
(retryable: the router falls back to the next backend); after it, the same
error ends the stream (the router re-raises once an event went out).  Either
way the upstream response is closed, so the upstream sees the disconnect.
Unary calls (model lists, show, embed, load) are bounded as a whole by
``connect_timeout + first_token_timeout`` (``call_json``).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any, Awaitable, Iterable, Optional, TypeVar

import aiohttp
import orjson

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
from mlxgate.config import UpstreamTimeouts

T = TypeVar("T")

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
    """Map an upstream HTTP status onto a BackendError (docs/architecture.md, "Errors", reversed)."""
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
    if status == 429 or status == 503 or status == 529:
        # 529: Anthropic's "overloaded_error", a busy upstream like a 503.
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


def error_for_exception(
    who: str,
    exc: BaseException,
    secrets: Iterable[Optional[str]] = (),
    timeouts: Optional[UpstreamTimeouts] = None,
) -> BackendError:
    """Map an aiohttp/asyncio client failure onto a BackendError.

    The message names the failure kind, never headers (which hold keys)."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        within = f" within {timeouts.connect_timeout:g} s" if timeouts is not None else ""
        return DeadlineExceeded(f"{who}: could not connect to upstream{within} (connect_timeout)")
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


class LineReader:
    """The body's lines as they complete, and whether another one is already here.

    Reads whatever bytes have arrived (no buffering of the whole body); a final
    line without a newline is given at EOF.  ``ready()`` says, without waiting,
    whether a complete line is buffered: an adapter uses it to merge every
    event one network read brought into one chunk (an upstream that answers
    at once costs one gRPC message, not one per token).  A line over
    MAX_LINE_BYTES is an upstream fault (Unavailable), not a reason to grow
    without bound."""

    def __init__(self, resp: aiohttp.ClientResponse, who: str = "upstream") -> None:
        self._chunks = resp.content.iter_any()
        self._who = who
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._eof = False

    def ready(self) -> bool:
        if self._buf.find(b"\n", self._scanned) >= 0:
            return True
        self._scanned = len(self._buf)
        return self._eof and bool(self._buf.strip())

    def take(self) -> list[bytes]:
        """Every complete line buffered now, without waiting ([] when none);
        at EOF the final line without a newline too."""
        buf = self._buf
        end = buf.rfind(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(buf)
            if self._eof and buf.strip():
                lines = [bytes(buf).rstrip(b"\r")]
                buf.clear()
                self._scanned = 0
                return lines
            return []
        block = bytes(buf[:end])
        del buf[: end + 1]
        self._scanned = 0
        lines = block.split(b"\n")
        if b"\r" in block:
            lines = [line.rstrip(b"\r") for line in lines]
        return lines

    async def batch(self) -> list[bytes]:
        """Every complete line that is here, waiting for the network until
        there is at least one; [] at the end of the body."""
        while True:
            lines = self.take()
            if lines or self._eof:
                return lines
            await self._fill()

    async def _fill(self) -> None:
        """One network read into the buffer (EOF noted)."""
        try:
            data = await anext(self._chunks)
        except StopAsyncIteration:
            self._eof = True
            return
        self._buf += data
        if len(self._buf) > MAX_LINE_BYTES and self._buf.find(b"\n", self._scanned) < 0:
            raise Unavailable(f"{self._who}: a line of the response exceeds {MAX_LINE_BYTES} bytes")

    def __aiter__(self) -> "LineReader":
        return self

    async def __anext__(self) -> bytes:
        while True:
            i = self._buf.find(b"\n", self._scanned)
            if i >= 0:
                line = bytes(self._buf[:i]).rstrip(b"\r")
                del self._buf[: i + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            if self._eof:
                if self._buf.strip():
                    line = bytes(self._buf).rstrip(b"\r")
                    self._buf.clear()
                    return line
                raise StopAsyncIteration
            await self._fill()


def iter_lines(resp: aiohttp.ClientResponse, who: str = "upstream") -> LineReader:
    """Each line of the body (without its newline) as soon as it is complete."""
    return LineReader(resp, who)


def json_body(kwargs: dict[str, Any]) -> dict[str, Any]:
    """aiohttp request arguments with ``json=`` sent as orjson's bytes
    (aiohttp's own ``json=`` encodes with the standard library, several
    times slower)."""
    body = kwargs.pop("json", None)
    if body is None:
        return kwargs
    headers = dict(kwargs.pop("headers", None) or {})
    headers.setdefault("Content-Type", "application/json")
    return {**kwargs, "data": orjson.dumps(body), "headers": headers}


def connect_timeout(timeouts: UpstreamTimeouts) -> aiohttp.ClientTimeout:
    """aiohttp's own clock on an upstream call: connecting only.

    No ``total`` (a generation may run for as long as tokens keep coming) and
    no ``sock_read``: the token clocks below replace it, since any byte (a
    keep-alive line) would reset it."""
    return aiohttp.ClientTimeout(
        total=None, connect=timeouts.connect_timeout, sock_connect=timeouts.connect_timeout, sock_read=None
    )


class TokenClock:
    """The first-token clock, then the idle clock, of one streamed call.

    It starts when made (just before the request is sent), with the deadline
    ``first_token_timeout`` ahead; each ``token()`` sets it ``idle_timeout``
    ahead of now.  Nothing else moves it forward, except ``extend`` for time
    the caller held the stream (see ``UpstreamStream``)."""

    def __init__(self, who: str, timeouts: UpstreamTimeouts) -> None:
        self.who = who
        self.timeouts = timeouts
        self._loop = asyncio.get_running_loop()
        self.started = self._loop.time()
        self.deadline = self.started + timeouts.first_token_timeout
        self.tokens = 0

    def token(self) -> None:
        """A token arrived: the next one is due within ``idle_timeout``."""
        self.tokens += 1
        self.deadline = self._loop.time() + self.timeouts.idle_timeout

    def extend(self, seconds: float) -> None:
        self.deadline += max(0.0, seconds)

    def error(self) -> DeadlineExceeded:
        """The error for a deadline that passed, naming the clock."""
        if self.tokens == 0:
            return DeadlineExceeded(
                f"{self.who}: no token within {self.timeouts.first_token_timeout:g} s of the request "
                "(first_token_timeout)"
            )
        return DeadlineExceeded(f"{self.who}: no token for {self.timeouts.idle_timeout:g} s (idle_timeout)")

    async def bound(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` until the current deadline; past it, ``aw`` is cancelled
        and ``DeadlineExceeded`` raised.  Other timeouts from inside ``aw``
        (aiohttp's connect timeout) pass through unchanged."""
        timeout = asyncio.timeout_at(self.deadline)
        try:
            async with timeout:
                return await aw
        except TimeoutError:
            if timeout.expired():
                raise self.error() from None
            raise


class UpstreamStream:
    """One streamed call to an upstream: its response, read line by line under
    the token clocks.  Both adapters use it the same way::

        stream = UpstreamStream(self.name, self.timeouts, secrets)
        try:
            await stream.open(session, url, json=body, headers=headers)
            async for line in stream:      # each read bounded by the clock
                ...                        # parse; stream.token() if it carried one
            stream.finish()                # the answer is complete (before yielding Done)
        finally:
            stream.close()                 # released when finished, else dropped

    Time the caller spends between two lines (parsing, and handing a token
    downstream, where a slow client may push back) does not count against
    the upstream: the deadline is moved on by that much.  So the clocks
    measure the upstream's silence only.
    """

    def __init__(self, who: str, timeouts: UpstreamTimeouts, secrets: Iterable[Optional[str]] = ()) -> None:
        self.who = who
        self.timeouts = timeouts
        self.secrets = tuple(secrets)
        self.clock: Optional[TokenClock] = None
        self.resp: Optional[aiohttp.ClientResponse] = None
        self._lines: Optional[LineReader] = None
        self._handed_at: Optional[float] = None
        self._finished = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def _fail(self, exc: BaseException) -> BackendError:
        return error_for_exception(self.who, exc, self.secrets, self.timeouts)

    async def open(self, session: aiohttp.ClientSession, url: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """POST the request and wait for a 2xx answer's headers (under the
        first-token clock, which starts here); an error status raises its
        BackendError."""
        self.clock = TokenClock(self.who, self.timeouts)
        self._loop = self.clock._loop
        try:
            self.resp = await self.clock.bound(
                session.post(url, timeout=connect_timeout(self.timeouts), **json_body(kwargs))
            )
        except BackendError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._fail(e) from None
        await raise_for_response(self.who, self.resp, self.secrets)
        self._lines = iter_lines(self.resp, self.who)
        return self.resp

    def token(self) -> None:
        """The line just read carried a token (text, thinking, a tool-call delta, logprobs)."""
        assert self.clock is not None
        self.clock.token()

    def finish(self) -> None:
        """The answer is complete: ``close`` returns the connection to the pool."""
        self._finished = True

    def more_ready(self) -> bool:
        """Another complete line is already here (read with no wait): the
        caller may hold back what it has and hand both on together."""
        return self._lines is not None and self._lines.ready()

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> bytes:
        assert self.clock is not None and self._lines is not None and self._loop is not None, "open() first"
        loop = self._loop
        if self._handed_at is not None:
            self.clock.extend(loop.time() - self._handed_at)
            self._handed_at = None
        try:
            if self._lines.ready():
                # Already here: no wait, so no clock (a timer per line costs more than the line).
                line = await anext(self._lines)
            else:
                line = await self.clock.bound(anext(self._lines))
        except (StopAsyncIteration, BackendError):
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._fail(e) from None
        self._handed_at = loop.time()
        return line

    async def batch(self) -> list[bytes]:
        """Every complete line that has arrived, at least one (waiting under
        the clock when none is here yet); [] at the end of the body.

        What one network read brought comes as one batch: an adapter parses
        it in one go and hands its tokens on as one chunk (an upstream that
        answers at once costs one message downstream, not one per token)."""
        assert self.clock is not None and self._lines is not None and self._loop is not None, "open() first"
        loop = self._loop
        lines = self._lines.take()
        if lines:
            self._handed_at = loop.time()
            return lines
        if self._handed_at is not None:
            self.clock.extend(loop.time() - self._handed_at)
        try:
            lines = await self.clock.bound(self._lines.batch())
        except BackendError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._fail(e) from None
        self._handed_at = loop.time()
        return lines

    def close(self) -> None:
        if self.resp is None:
            return
        if self._finished:
            self.resp.release()
        else:
            # Timed out, failed, or cancelled mid-stream: drop the connection
            # so the upstream sees the disconnect and stops generating.
            self.resp.close()


async def call_json(
    session: aiohttp.ClientSession,
    who: str,
    timeouts: UpstreamTimeouts,
    method: str,
    url: str,
    secrets: Iterable[Optional[str]] = (),
    **kwargs: Any,
) -> Any:
    """One unary call (list models, show, embed, load, ...); the parsed JSON body.

    A unary answer is its own first token, so the whole call -- connecting,
    the headers and the body -- is bounded by ``connect_timeout +
    first_token_timeout``, and connecting alone by ``connect_timeout``."""
    total = timeouts.connect_timeout + timeouts.first_token_timeout
    timeout = asyncio.timeout(total)
    try:
        async with timeout:
            async with session.request(method, url, timeout=connect_timeout(timeouts), **json_body(kwargs)) as resp:
                await raise_for_response(who, resp, secrets)
                raw = await resp.read()
    except BackendError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        if timeout.expired():
            raise DeadlineExceeded(
                f"{who}: no answer within {total:g} s (connect_timeout + first_token_timeout)"
            ) from None
        raise error_for_exception(who, e, secrets, timeouts) from None
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        raise Unavailable(f"{who}: upstream sent a body that is not JSON") from None


class UpstreamSession:
    """A lazily created aiohttp session (a ClientSession belongs to the running
    event loop, so it cannot be made in __init__), closed by ``close``.
    Subclasses set ``timeouts``."""

    _session: Optional[aiohttp.ClientSession] = None
    timeouts: UpstreamTimeouts

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=connect_timeout(self.timeouts), raise_for_status=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
