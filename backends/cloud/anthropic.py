"""AnthropicBackend: the Backend protocol over Anthropic's Messages API, so
"cloud last" can be Claude (a ``[[cloud.providers]]`` entry with ``kind =
"anthropic"``, or ``ANTHROPIC_API_KEY`` / ``ANTHROPIC_BASE_URL``).

Generation streams from ``POST {base_url}/v1/messages`` (``base_url`` is the
API root, as ``ANTHROPIC_BASE_URL``: ``https://api.anthropic.com``); the named
SSE events are read by ``anthropic_wire.StreamState`` into Chunks and the final
``Done`` (its usage, stop reason and stop sequence).  Tokens are counted by
``POST /v1/messages/count_tokens``; models come from the provider's ``models``
list or ``GET /v1/models``.  Anthropic has no embeddings (UNIMPLEMENTED).

The key is read once from ``env[provider.api_key_env]`` and sent only in the
``x-api-key`` header (never ``Authorization``), with ``anthropic-version``.
As for every cloud provider (``CloudBackend``, whose plumbing this shares):
it never appears in a repr, a log line, an exception message or a metric
label, since every upstream error text passes through ``redact``.

Timeouts (``backends.http_upstream``): connect, first token, idle.  Only
events that carry a token move the clocks -- a text or thinking delta or a
piece of a tool call's input; ``ping`` events (what Anthropic sends while a
model is busy), block starts and stops, signatures and usage do not, so an
upstream that only keeps the connection warm is still ended.  An ``error``
event becomes the error its type names (``overloaded_error``: busy, so the
router may fall back before the first token).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator, Optional

from backends.cloud import anthropic_wire as wire
from backends.cloud.backend import CloudBackend
from backends.errors import BackendError, Unavailable, Unimplemented
from backends.http_upstream import UpstreamStream, error_for_status, redact
from backends.types import Chunk, Done, EmbedRequest, EmbedResult, Event, GenerateRequest, ModelInfo, TokenCount
from backends.types import RerankRequest, RerankResult
from mlxgate.dialects import anthropic as dialect

log = logging.getLogger(__name__)

#: Pages of GET /v1/models read at most (1,000 models each).
MAX_MODEL_PAGES = 10


class AnthropicBackend(CloudBackend):
    """Backend named ``cloud:<provider.name>`` speaking Anthropic's Messages API."""

    def __repr__(self) -> str:  # never the key
        return f"AnthropicBackend({self.name!r}, {self.base_url!r})"

    def _auth_headers(self, key: str) -> dict[str, str]:
        return {"x-api-key": key}

    def _headers(self) -> dict[str, str]:
        return {**super()._headers(), "anthropic-version": dialect.VERSION}

    # ------------------------------------------------------------ generate

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        body = wire.messages_body(req, self.name)
        started = time.monotonic_ns()
        stream = UpstreamStream(self.name, self.timeouts, self._secrets)
        try:
            await stream.open(self._get_session(), self.base_url + "/v1/messages", json=body,
                              headers=self._headers())
            state = wire.StreamState()
            async for line in stream:
                if not line.startswith(b"data:"):
                    continue  # "event:" names repeat the data's type; blank separators; ": comments"
                try:
                    obj = json.loads(line[5:].strip())
                except ValueError:
                    raise Unavailable(f"{self.name}: upstream sent an event that is not JSON") from None
                if not isinstance(obj, dict):
                    continue
                if obj.get("type") == "error":
                    raise self._stream_error(obj)
                tokens = state.token_events
                chunk = state.feed(obj)
                if state.token_events != tokens:
                    stream.token()
                if chunk is not None:
                    yield chunk
                if state.stopped:
                    break
            if not state.stopped and state.stop_reason is None:
                raise Unavailable(f"{self.name}: upstream ended the stream before it finished")
            calls = state.unfinished_calls()
            if calls:
                yield Chunk(tool_calls=calls)
            reason = state.finish()
            stream.finish()
            yield Done(
                finish_reason=reason,  # type: ignore[arg-type]
                prompt_tokens=state.prompt_tokens,
                completion_tokens=state.output_tokens,
                cached_prompt_tokens=state.cache_read,
                total_duration_ns=time.monotonic_ns() - started,
                backend=self.name,
                model=req.model,
                stop_sequence=state.stop_sequence if state.stop_reason == "stop_sequence" else "",
            )
        finally:
            stream.close()

    def _stream_error(self, obj: dict) -> BackendError:
        status, message = wire.error_of_event(obj)
        return error_for_status(self.name, status, redact(message, self._secrets))

    # ------------------------------------------------------------ unary

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        data = await self._call("POST", "/v1/messages/count_tokens", wire.count_tokens_body(req, self.name))
        n = data.get("input_tokens") if isinstance(data, dict) else None
        if not isinstance(n, int) or isinstance(n, bool):
            raise Unavailable(f"{self.name}: upstream answered count_tokens without input_tokens")
        return TokenCount(input_tokens=n, backend=self.name, model=req.model)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        raise Unimplemented(f"{self.name}: Anthropic's API has no embeddings")

    async def rerank(self, req: RerankRequest) -> RerankResult:
        raise Unimplemented(f"{self.name}: Anthropic's API has no rerank")

    async def list_models(self) -> list[ModelInfo]:
        if self.provider.models:
            names = list(self.provider.models)
        else:
            names = []
            after: Optional[str] = None
            for _ in range(MAX_MODEL_PAGES):
                query = "?limit=1000" + (f"&after_id={after}" if after else "")
                data: Any = await self._call("GET", "/v1/models" + query)
                ids, after = wire.model_ids(data)
                names += ids
                if after is None:
                    break
        return [ModelInfo(name=n, backend=self.name) for n in names if n]
