"""Anthropic Messages routes: thin handlers over ``translate`` and the client.

Streams are SSE with Anthropic's named events: ``event: <type>`` then
``data: {...}`` (the data's ``type`` is the event's name): ``message_start``,
``ping``, then per content block ``content_block_start`` /
``content_block_delta``... / ``content_block_stop``, then ``message_delta``
(stop reason, usage) and ``message_stop``.  A ``ping`` also goes out whenever
the stream has been silent for ``PING_INTERVAL_S`` (a backend stalled, a slow
upstream), as Anthropic's streams carry pings.  An error after the stream
began is an ``event: error`` with the error body, and the stream ends there,
without ``message_stop``.

Headers ``x-api-key`` (the trust middleware), ``anthropic-version`` and
``anthropic-beta`` are accepted; the version is not checked (one version of
the API is served) and betas are ignored.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import generation, image_urls, overhead
from gateway.anthropic import translate as tr
from gateway.generation import Renderer
from gateway.imagefetch import read_json_fetching
from gateway.render import json_response
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import BACKEND_HEADER, client, request_id
from gateway.streaming import event_frame
from mlxgate.dialects import anthropic as wire
from mlxgate.v1 import inference_pb2 as pb

#: Seconds of silence after which a stream gets a ``ping``.
PING_INTERVAL_S = 10.0


class _Message(Renderer):
    """One Message: ``MessageStream``'s events as named SSE events, pings in
    the silences; or, not streamed, the Message it builds."""

    dialect = "anthropic"
    ping = event_frame({"type": "ping"})
    frame = staticmethod(event_frame)

    def __init__(self, model: str) -> None:
        self.message = tr.MessageStream(model)
        self.ping_interval = PING_INTERVAL_S

    def start(self) -> list[dict[str, Any]]:
        return self.message.start()

    def event(self, index: int, ev: pb.GenerateResponse) -> list[dict[str, Any]]:
        return self.message.render(ev)

    def take(self, index: int, ev: pb.GenerateResponse) -> None:
        self.message.render(ev)

    async def whole(self) -> Any:
        return self.message.message()


async def messages(request: web.Request) -> web.StreamResponse:
    p = tr.messages_request(await read_json_fetching(request, image_urls.anthropic))
    stream = client(request).generate(p.req, request_id(request), overhead.of(request))
    return await generation.run(request, [stream], _Message(p.model), p.stream)


async def count_tokens(request: web.Request) -> web.Response:
    req = tr.count_tokens_request(await read_json_fetching(request, image_urls.anthropic))
    res = await client(request).count_tokens(req, request_id(request))
    return json_response(tr.tokens_count(res), headers={BACKEND_HEADER: res.backend} if res.backend else None)


_STREAMED = ("one Message, or with stream=true server-sent events: event: <type> / data: <event>, from "
             "message_start to message_stop, pings between; a stream that failed ends with an error event")

#: Every Anthropic route: the app registers them, /openapi.json documents them.
ROUTES: list[Route] = [
    Route("POST", "/v1/messages", messages, "Create a message (Anthropic Messages API)",
          body=wire.MessagesRequest, answer=wire.AnthropicMessage, stream="sse", stream_item=wire.StreamEvent,
          description=_STREAMED),
    Route("POST", "/v1/messages/count_tokens", count_tokens, "Count the tokens of a message (Anthropic)",
          body=wire.CountTokensRequest, answer=wire.MessageTokensCount,
          description="the prompt tokens the message's input takes with the model's chat template; an input "
                      "beyond the model's context is 400"),
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)
