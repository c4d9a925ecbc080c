"""A small HTTP client for Ollama's REST API (docs/api.md), as Ollama's own
CLI uses it (api/client.go): JSON requests, JSON or NDJSON answers, errors
as ``{"error": "..."}`` with a 4xx/5xx status before any output or as the
last NDJSON line after it.

Synchronous (http.client): a command does one thing at a time, and Ctrl-C
(KeyboardInterrupt) stops a blocking read where it is.  One connection per
request.  Every failure is an ``ApiError`` with a message fit for one line.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from importlib import metadata
from typing import Any, BinaryIO, Iterator, Optional

from mlxgate_cli.client.host import ClientSettings

#: Seconds to wait for the server to accept a connection.  Reads have no
#: limit: a server may be silent for minutes while it loads a model, and
#: Ctrl-C ends any wait.
CONNECT_TIMEOUT_S = 10.0
#: The longest NDJSON line read (Ollama's client allows 8 MB) and the largest
#: JSON answer read whole.
MAX_LINE_BYTES = 8 * 1000 * 1000
MAX_BODY_BYTES = 64 * 1000 * 1000


class ApiError(Exception):
    """What went wrong, in one line; ``status`` when the server answered."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class ServerDown(ApiError):
    """Nothing answers at the server's address."""


def _user_agent() -> str:
    try:
        return f"mlxgate/{metadata.version('mlxgate')} (cli)"
    except metadata.PackageNotFoundError:
        return "mlxgate (cli)"


def _error_message(body: bytes, status: int, reason: str) -> str:
    """The ``error`` of an Ollama error body (a string, or OpenAI's object
    from a proxy), else the body's text, else the status line."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict):
        err = err.get("message")
    if isinstance(err, str) and err:
        return err
    text = body.decode("utf-8", "replace").strip()
    return text[:500] if text else f"{status} {reason}".strip()


class OllamaAPI:
    """The server at ``settings.url``; each method is one request."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._headers = {"User-Agent": _user_agent()}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"

    # ------------------------------------------------------------ requests

    def get(self, path: str) -> Any:
        return self._json(self._send("GET", path))

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._json(self._send("POST", path, body))

    def delete(self, path: str, body: dict[str, Any]) -> None:
        self._send("DELETE", path, body).read(MAX_BODY_BYTES)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The NDJSON objects of a streamed answer, one by one; an ``error``
        line (after output) raises ``ApiError``."""
        resp = self._send("POST", path, body, accept="application/x-ndjson")
        with resp:
            while True:
                line = self._readline(resp)
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise ApiError(f"the server sent a line that is not JSON: {line[:200]!r}") from None
                if not isinstance(obj, dict):
                    raise ApiError(f"the server sent a line that is not a JSON object: {line[:200]!r}")
                if obj.get("error"):
                    raise ApiError(_error_message(line, resp.status, ""))
                yield obj

    def blob_exists(self, digest: str) -> bool:
        """``HEAD /api/blobs/<digest>``: 200 when the server has it, 404 when not."""
        try:
            self._send("HEAD", f"/api/blobs/{digest}").read()
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    def upload_blob(self, digest: str, data: BinaryIO, size: int) -> None:
        """``POST /api/blobs/<digest>`` with the bytes of ``data`` (``size`` of them), streamed."""
        self._send("POST", f"/api/blobs/{digest}", data, size=size).read(MAX_BODY_BYTES)

    # ------------------------------------------------------------ transport

    def _connection(self) -> http.client.HTTPConnection:
        s = self.settings
        if s.scheme == "https":
            return http.client.HTTPSConnection(s.host, s.port, timeout=CONNECT_TIMEOUT_S,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(s.host, s.port, timeout=CONNECT_TIMEOUT_S)

    def _send(self, method: str, path: str, body: Any = None, *, size: Optional[int] = None,
              accept: str = "application/json") -> http.client.HTTPResponse:
        """One request; the answer when its status is below 400, else ``ApiError``."""
        headers = {**self._headers, "Accept": accept}
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
            headers["Content-Length"] = str(size)
        conn = self._connection()
        url = self.settings.url
        try:
            conn.connect()
        except (OSError, ssl.SSLError) as e:
            conn.close()
            raise ServerDown(self._down_message(e)) from None
        assert conn.sock is not None
        conn.sock.settimeout(None)
        try:
            conn.request(method, self.settings.path + path, body=body, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ApiError(f"lost the connection to {url}: {e or type(e).__name__}") from None
        if resp.status >= 400:
            with resp:
                data = b"" if method == "HEAD" else resp.read(MAX_BODY_BYTES)
            raise ApiError(_error_message(data, resp.status, resp.reason), resp.status)
        return resp

    def _down_message(self, e: BaseException) -> str:
        url = self.settings.url
        if isinstance(e, socket.gaierror):
            return f"could not connect to mlxgate at {url}: unknown host {self.settings.host!r}"
        if isinstance(e, ssl.SSLError):
            return f"could not connect to mlxgate at {url}: TLS: {e}"
        if isinstance(e, (socket.timeout, TimeoutError)):
            return f"could not connect to mlxgate at {url}: no answer in {CONNECT_TIMEOUT_S:g} s"
        return f"could not connect to mlxgate at {url} — is it running? (mlxgate serve)"

    def _readline(self, resp: http.client.HTTPResponse) -> bytes:
        try:
            line = resp.readline(MAX_LINE_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            raise ApiError(f"lost the connection to {self.settings.url}: {e or type(e).__name__}") from None
        if len(line) > MAX_LINE_BYTES:
            raise ApiError(f"the server sent a line longer than {MAX_LINE_BYTES} bytes")
        return line

    def _json(self, resp: http.client.HTTPResponse) -> Any:
        with resp:
            try:
                data = resp.read(MAX_BODY_BYTES + 1)
            except (OSError, http.client.HTTPException) as e:
                raise ApiError(f"lost the connection to {self.settings.url}: {e or type(e).__name__}") from None
        if len(data) > MAX_BODY_BYTES:
            raise ApiError(f"the server's answer is larger than {MAX_BODY_BYTES} bytes")
        if not data.strip():
            return {}
        try:
            return json.loads(data)
        except ValueError:
            raise ApiError(f"the server's answer is not JSON: {data[:200]!r}") from None
