"""An OpenAI-compatible upstream that answers at once, for measuring the gateway hop.

A bare asyncio protocol (no framework) so that the upstream costs as little
as possible and what a benchmark measures is the gateway in front of it:
``POST /v1/chat/completions`` answers a fixed chat completion, or with
``"stream": true`` a fixed number of SSE chunks, the usage event and
``[DONE]`` in one write; ``GET /v1/models`` lists one model.  HTTP/1.1 with
keep-alive and Content-Length bodies only (what aiohttp clients send).
Loopback only; it runs until stopped.
"""

from __future__ import annotations

import asyncio
import json
from typing import Optional

MODEL = "instant"


def _answer(tokens: int) -> bytes:
    return json.dumps({
        "id": "chatcmpl-instant", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * tokens},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens},
    }).encode()


def _stream(tokens: int) -> bytes:
    head = {"id": "chatcmpl-instant", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    out = [b"data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "finish_reason": None}]}).encode() + b"\n\n"]
    piece = b"data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {"content": "tok "},
                                                         "finish_reason": None}]}).encode() + b"\n\n"
    out += [piece] * tokens
    last = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    out.append(b"data: " + json.dumps(last).encode() + b"\n\n")
    out.append(b"data: " + json.dumps({**head, "choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}}).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, server: "InstantUpstream") -> None:
        self.server = server
        self.buf = b""
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self._answer(head.split(" ", 2), body)

    def _answer(self, request_line: list[str], body: bytes) -> None:
        assert self.transport is not None
        method, path = request_line[0], request_line[1]
        if method == "GET" and path.endswith("/models"):
            payload, ctype = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode(), \
                b"application/json"
        elif method == "POST" and path.endswith("/chat/completions"):
            stream = b'"stream":true' in body.replace(b" ", b"")
            payload = self.server.stream if stream else self.server.answer
            ctype = b"text/event-stream" if stream else b"application/json"
        else:
            payload, ctype = b'{"error": {"message": "not found"}}', b"application/json"
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: " + str(len(payload)).encode()
            + b"\r\nConnection: keep-alive\r\n\r\n" + payload
        )


class InstantUpstream:
    def __init__(self, tokens: int = 64) -> None:
        self.answer = _answer(tokens)
        self.stream = _stream(tokens)
        self._server: Optional[asyncio.AbstractServer] = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> "InstantUpstream":
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Protocol(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
