"""CloudBackend: the Backend protocol over an OpenAI-compatible HTTP API.

Chat (and non-raw prompts, sent as a one-turn chat) stream from
``/chat/completions``; raw prompts from ``/completions``.  Server-sent events
are parsed as they arrive (``data:`` lines, ``[DONE]``), with
``stream_options.include_usage`` so the final ``Done`` carries token counts.

Timeouts (``backends.http_upstream``): ``connect_timeout`` bounds connecting;
``first_token_timeout`` bounds the wait from the request to the first event
that carries text, reasoning, a tool-call delta or logprobs (SSE comments such
as ``: keep-alive``, role-only deltas and usage events do not count);
``idle_timeout`` bounds the wait between two such events.  A unary call is
bounded as a whole by ``connect_timeout + first_token_timeout``.

The API key is read once from ``env[provider.api_key_env]`` and only ever
placed in the Authorization header.  It never appears in a repr, a log line,
an exception message or a metric label: every upstream error text is passed
through ``redact`` before it is raised.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator, Mapping, Optional

import orjson

from backends.cloud import wire
from backends.errors import BackendError, InvalidArgument, ModelNotFound, Unavailable, Unimplemented
from backends.http_upstream import (
    UpstreamSession,
    UpstreamStream,
    call_json,
    error_for_status,
    error_text_from_body,
    redact,
)
from backends.types import (
    Chunk,
    Done,
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
from backends.types import RerankRequest, RerankResult
from mlxgate.config import CloudProvider, resolved_timeouts

log = logging.getLogger(__name__)


class CloudBackend(UpstreamSession):
    """Backend named ``cloud:<provider.name>``."""

    #: OpenAI's API takes token ids, but ids in a request to this gateway are a
    #: local model's; the provider's model would read them as other words.
    takes_token_ids = False

    def __init__(self, provider: CloudProvider, env: Mapping[str, str]) -> None:
        self.provider = provider
        self.timeouts = resolved_timeouts(provider)
        self.name = f"cloud:{provider.name}"
        self.base_url = provider.base_url.rstrip("/")
        self.__key: Optional[str] = env.get(provider.api_key_env) if provider.api_key_env else None
        if provider.api_key_env and not self.__key:
            log.warning("%s: environment variable %s is not set; calling without a key", self.name,
                        provider.api_key_env)

    def __repr__(self) -> str:  # never the key
        return f"CloudBackend({self.name!r}, {self.base_url!r})"

    # ------------------------------------------------------------ plumbing

    @property
    def _secrets(self) -> tuple[Optional[str], ...]:
        return (self.__key,)

    def _auth_headers(self, key: str) -> dict[str, str]:
        """Where the key goes (OpenAI: a bearer token; Anthropic's adapter overrides it)."""
        return {"Authorization": f"Bearer {key}"}

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self.__key:
            h.update(self._auth_headers(self.__key))
        return h

    async def _call(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        return await call_json(
            self._get_session(), self.name, self.timeouts, method, self.base_url + path, self._secrets,
            json=body, headers=self._headers(),
        )

    # ------------------------------------------------------------ generate

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        path, body = wire.generate_body(req, self.name)
        started = time.monotonic_ns()
        stream = UpstreamStream(self.name, self.timeouts, self._secrets)
        try:
            await stream.open(self._get_session(), self.base_url + path, json=body, headers=self._headers())
            state = wire.StreamState()
            saw_done_marker = False
            # The events one network read brought go on as one chunk (UpstreamStream.batch).
            while not saw_done_marker:
                lines = await stream.batch()
                if not lines:
                    break
                tokens = state.token_events
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, ": comment", "event:", "id:"
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        saw_done_marker = True
                        break
                    try:
                        obj = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        raise Unavailable(f"{self.name}: upstream sent an event that is not JSON") from None
                    if isinstance(obj, dict):
                        if "error" in obj:
                            raise self._stream_error(obj)
                        state.add(obj)
                if state.token_events != tokens:
                    stream.token()
                chunk = state.take()
                if chunk is not None:
                    yield chunk
            if not saw_done_marker and state.finish is None:
                raise Unavailable(f"{self.name}: upstream ended the stream before it finished")
            calls = state.tool_calls()
            if calls:
                yield Chunk(tool_calls=calls)
            reason = wire.finish_reason(state.finish)
            if calls and reason == "stop":
                reason = "tool_calls"
            stream.finish()
            yield Done(
                finish_reason=reason,  # type: ignore[arg-type]
                prompt_tokens=state.prompt_tokens,
                completion_tokens=state.completion_tokens,
                cached_prompt_tokens=state.cached_tokens,
                total_duration_ns=time.monotonic_ns() - started,
                backend=self.name,
                model=req.model,
            )
        finally:
            stream.close()

    def _stream_error(self, obj: dict) -> BackendError:
        err = obj.get("error")
        status = 0
        if isinstance(err, dict):
            code = err.get("code")
            status = code if isinstance(code, int) else 0
        text = redact(error_text_from_body(json.dumps(obj).encode()), self._secrets)
        if status >= 400:
            return error_for_status(self.name, status, text)
        return Unavailable(f"{self.name}: {text}")

    # ------------------------------------------------------------ unary

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        # OpenAI-compatible APIs have no endpoint that counts a chat's tokens.
        raise Unimplemented(f"{self.name}: counting tokens is not supported by OpenAI-compatible APIs")

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        if req.input_tokens:
            raise InvalidArgument(f"{self.name}: embeddings from token ids are not sent to a cloud API; send text")
        body = wire.embed_body(req.model, list(req.inputs), req.dimensions, self.name)
        started = time.monotonic_ns()
        data = await self._call("POST", "/embeddings", body)
        items = sorted(data.get("data") or [], key=lambda d: d.get("index", 0))
        usage = data.get("usage") or {}
        return EmbedResult(
            embeddings=[[float(x) for x in d.get("embedding") or []] for d in items],
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            model=req.model,
            backend=self.name,
            total_duration_ns=time.monotonic_ns() - started,
        )

    async def rerank(self, req: RerankRequest) -> RerankResult:
        """The provider's ``/rerank`` (vLLM, Jina, Cohere's v1 shape); a 404 (no
        such endpoint, or no such model there) is Unimplemented, so the router
        moves on."""
        try:
            data = await self._call("POST", "/rerank", wire.rerank_body(req, self.name))
        except ModelNotFound as e:
            raise Unimplemented(f"{self.name}: no /rerank for model '{req.model}' ({e.message})") from None
        usage = data.get("usage") if isinstance(data, dict) else None
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
        ranked = wire.rerank_result(data, len(req.documents), self.name)
        return RerankResult(ranked=ranked[: req.top_n] if req.top_n else ranked,
                            total_tokens=total if isinstance(total, int) else 0, model=req.model, backend=self.name)

    async def list_models(self) -> list[ModelInfo]:
        if self.provider.models:
            names = list(self.provider.models)
        else:
            data = await self._call("GET", "/models")
            names = [m.get("id", "") for m in data.get("data") or [] if isinstance(m, dict)]
        return [ModelInfo(name=n, backend=self.name) for n in names if n]

    async def _require(self, name: str) -> ModelInfo:
        for m in await self.list_models():
            if m.name == name:
                return m
        raise ModelNotFound(f"{self.name}: model '{name}' not found")

    async def show_model(self, name: str) -> ModelShow:
        info = await self._require(name)
        return ModelShow(info=info, capabilities=["completion"])

    async def list_running(self) -> list[RunningModel]:
        return []  # a cloud API has no notion of loaded models

    async def load_model(self, name: str, keep_alive: Optional[float]) -> LoadResult:
        if not name:
            raise InvalidArgument("model is required")
        await self._require(name)
        return LoadResult(model=name, backend=self.name)

    async def unload_model(self, name: str) -> bool:
        return False

