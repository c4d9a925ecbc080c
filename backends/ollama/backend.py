"""OllamaBackend: the Backend protocol over an upstream Ollama's REST API.

Streams are NDJSON: each line is translated into a ``Chunk`` as soon as it
arrives, and the final ``"done": true`` line into ``Done``.  Closing the
generator closes the upstream HTTP response, so Ollama stops generating.

Timeouts (``backends.http_upstream``): ``connect_timeout`` bounds connecting;
``first_token_timeout`` bounds the wait from the request to the first line that
carries text, thinking, a tool call or logprobs (blank lines and lines with
empty content, which a proxy may send to keep the connection warm, do not
count); ``idle_timeout`` bounds the wait between two such lines.  A unary call
is bounded as a whole by ``connect_timeout + first_token_timeout``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Optional

import orjson

from backends.errors import BackendError, ModelNotFound, Unavailable, Unimplemented
from backends.http_upstream import (
    UpstreamSession,
    UpstreamStream,
    call_json,
    error_text_from_body,
)
from backends.ollama import wire
from backends.types import (
    Chunk,
    EmbedRequest,
    EmbedResult,
    Event,
    GenerateRequest,
    LoadResult,
    ModelInfo,
    ModelShow,
    RunningModel,
    TokenCount,
)
from mlxgate.config import OllamaConfig, resolved_timeouts
from mlxgate.names import same_model

log = logging.getLogger(__name__)


class OllamaBackend(UpstreamSession):
    """Backend named "ollama" that forwards to ``config.upstream``."""

    name = "ollama"
    #: /api/embed takes text only (see ``wire.embed_body``).
    takes_token_ids = False

    def __init__(self, config: OllamaConfig) -> None:
        if not config.upstream:
            raise ValueError("OllamaBackend needs config.upstream (e.g. http://otherbox:11434)")
        self.config = config
        self.timeouts = resolved_timeouts(config)
        self.base_url = config.upstream.rstrip("/")

    def __repr__(self) -> str:
        return f"OllamaBackend({self.base_url!r})"

    # ------------------------------------------------------------ plumbing

    async def _call(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        """One request/response call; returns the parsed JSON body."""
        return await call_json(self._get_session(), self.name, self.timeouts, method, self.base_url + path, json=body)

    # ------------------------------------------------------------ generate

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        path, body = wire.generate_body(req)
        stream = UpstreamStream(self.name, self.timeouts)
        try:
            # The request id lets the upstream's logs be joined with ours.
            await stream.open(
                self._get_session(), self.base_url + path, json=body, headers={"X-Request-Id": req.request_id}
            )
            saw_tool_calls = False
            # The lines one network read brought go on as one chunk (UpstreamStream.batch).
            while True:
                lines = await stream.batch()
                if not lines:
                    break
                pending: list[Chunk] = []
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        raise Unavailable(f"{self.name}: upstream sent a line that is not JSON") from None
                    if not isinstance(obj, dict):
                        raise Unavailable(f"{self.name}: upstream sent an unexpected line")
                    if "error" in obj:
                        raise _stream_error(self.name, obj["error"])
                    chunk = wire.chunk_from_line(obj)
                    if chunk is not None:
                        saw_tool_calls = saw_tool_calls or bool(chunk.tool_calls)
                        pending.append(chunk)
                    if obj.get("done"):
                        if pending:
                            stream.token()
                            yield Chunk.merged(pending)
                        stream.finish()
                        yield wire.done_from_line(obj, self.name, req.model, saw_tool_calls)
                        return
                if pending:
                    stream.token()
                    yield Chunk.merged(pending)
            raise Unavailable(f"{self.name}: upstream ended the stream before its final line")
        finally:
            stream.close()

    # ------------------------------------------------------------ unary

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        # Ollama's API has no way to count a prompt without generating.
        raise Unimplemented(f"{self.name}: counting tokens is not supported by Ollama's API")

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        data = await self._call("POST", "/api/embed", wire.embed_body(req))
        return EmbedResult(
            embeddings=[list(map(float, e)) for e in data.get("embeddings") or []],
            prompt_tokens=int(data.get("prompt_eval_count") or 0),
            model=data.get("model") or req.model,
            backend=self.name,
            load_duration_ns=int(data.get("load_duration") or 0),
            total_duration_ns=int(data.get("total_duration") or 0),
        )

    async def list_models(self) -> list[ModelInfo]:
        data = await self._call("GET", "/api/tags")
        return [wire.model_info_from(m, self.name) for m in data.get("models") or []]

    async def show_model(self, name: str) -> ModelShow:
        data = await self._call("POST", "/api/show", {"model": name})
        return wire.show_from(name, data, self.name)

    async def list_running(self) -> list[RunningModel]:
        data = await self._call("GET", "/api/ps")
        return [wire.running_from(m, self.name) for m in data.get("models") or []]

    async def load_model(self, name: str, keep_alive: Optional[float]) -> LoadResult:
        body: dict[str, Any] = {"model": name, "stream": False}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        data = await self._call("POST", "/api/generate", body)
        return LoadResult(
            model=data.get("model") or name,
            backend=self.name,
            load_duration_ns=int(data.get("load_duration") or 0),
        )

    async def unload_model(self, name: str) -> bool:
        running = await self.list_running()
        was_loaded = any(same_model(r.name, name) for r in running)
        await self._call("POST", "/api/generate", {"model": name, "keep_alive": 0, "stream": False})
        return was_loaded



def _stream_error(who: str, error: Any) -> BackendError:
    """An ``{"error": ...}`` line inside a 200 stream."""
    text = error if isinstance(error, str) else error_text_from_body(json.dumps({"error": error}).encode())
    low = text.lower()
    if "not found" in low and "model" in low:
        return ModelNotFound(f"{who}: {text}")
    return Unavailable(f"{who}: {text}")

