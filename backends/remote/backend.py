"""RemoteBackend: another mlxgate inference service, over the same contract.

``mlxgate service`` on another machine (or another process) speaks
``mlxgate.v1.InferenceService``; this backend is its client, so the router
can send a model to it as to the local engine.  Requests go out with
``to_pb`` and events and results come back with ``from_pb``
(``backends/types.py``); the remote validates and routes them itself.

What travels over the hop:

* **Errors**: the remote's gRPC status becomes the matching ``BackendError``
  (``backends.errors.error_for_code``, the service's table read backwards),
  its message prefixed with this backend's name; a ``retry-after`` trailer is
  kept on ResourceExhausted.  Retryable ones (UNAVAILABLE, RESOURCE_EXHAUSTED,
  DEADLINE_EXCEEDED, NOT_FOUND, UNIMPLEMENTED; the remote's INTERNAL counts as
  UNAVAILABLE, as an upstream's 5xx does) let the router try the next backend
  before the first token.  A method the remote does not have (an older
  version) is UNIMPLEMENTED, so the router moves on.
* **Cancellation**: closing ``generate``'s generator cancels the gRPC call;
  the remote service then closes its own backend's generator (its MLX engine
  drops the sequence).
* **Deadlines**: a call carries the remaining time of the call being served
  (``backends.call_context``: the front's deadline, less what has passed) as its gRPC
  deadline.  A stream is also bounded by this remote's first-token and idle
  clocks (``connect_timeout``/``first_token_timeout``/``idle_timeout``, as
  for the HTTP upstreams: the same ``TokenClock``); a unary call by
  ``connect_timeout + first_token_timeout``.
* **Request ids**: ``x-request-id`` metadata on every call, and the
  request's ``request_id`` field (generate, embed), so the remote's logs and
  its own upstreams see the same id.
* **One hop**: every call is marked ``x-mlxgate-forwarded: 1``; the remote
  serves it from its own backends, never from its own remotes
  (``backends.call_context``), so fronts listing each other cannot loop.
* **Keys**: ``authorization: Bearer <key>`` on every InferenceService call
  when this remote has a key (``key_env``, ``key``, or the front's own).  The
  key is never logged and never in a repr.

Health: a background task watches the standard ``grpc.health.v1.Health``
service (``Watch`` on ``mlxgate.v1.InferenceService``; it needs no key).
``health`` is SERVING, NOT_SERVING (the remote is draining: it refuses new
calls), UNREACHABLE (the watch failed; retried with a backoff from
``backoff_min`` to ``backoff_max`` seconds), or UNKNOWN before the first
answer.  ``serving`` is False for NOT_SERVING and UNREACHABLE: the router
then sends it nothing new.  The task starts with the first call (or
``start()``) and ends with ``close()``.

The channel keeps the connection checked with HTTP/2 pings (every
``KEEPALIVE_S`` seconds, also with no call running), so a machine that goes
away without closing its connections (powered off, unplugged) turns the
watch UNREACHABLE within ``KEEPALIVE_S + KEEPALIVE_TIMEOUT_S`` seconds rather
than never; ``backends.service`` lets clients ping that often.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import uuid
from enum import Enum
from typing import Any, AsyncIterator, Mapping, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backends import call_context
from backends.errors import RETRY_AFTER_KEY, RETRYABLE_KEY, BackendError, Unavailable, error_for_code
from backends.gate import SERVICE_NAME, SHUTTING_DOWN
from backends.http_upstream import TokenClock, parse_retry_after
from backends.types import (
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
    event_from_pb,
    keep_alive_to_pb,
)
from backends.types import (
    DetokenizeRequest,
    DetokenizeResult,
    RerankRequest,
    RerankResult,
    TokenizeRequest,
    TokenizeResult,
)
from mlxgate.config import RemoteService, ServerConfig, resolved_timeouts
from mlxgate.grpc_tls import channel_credentials
from mlxgate.v1 import inference_pb2 as pb
from mlxgate.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: HTTP/2 keepalive pings on the channel (see the module docstring).
KEEPALIVE_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0


def _outgoing(req: GenerateRequest | EmbedRequest) -> Any:
    """The request as the remote takes it: the message it was accepted from
    when it came in as one (forwarded as it is, or with the model name
    routing chose and the request id given to it), else converted."""
    m = req.accepted
    if m is None:
        return req.to_pb()
    if (m.model, m.request_id) != (req.model, req.request_id):
        m = type(m)()
        m.CopyFrom(req.accepted)
        m.model, m.request_id = req.model, req.request_id
    return m


class HealthState(str, Enum):
    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    UNREACHABLE = "unreachable"


class RemoteBackend:
    """Backend named ``remote:<config.name>`` calling ``config.target``."""

    #: An mlxgate engine: the router places it with the local engine by
    #: warmth and load (``backends/routing/placement.py``).
    is_engine = True
    #: The remote decides: its own router refuses token ids for a model it
    #: does not run itself, with the same rule as here.
    takes_token_ids = True
    #: Calls here go to another mlxgate: a call that was itself forwarded is
    #: not forwarded again (``backends.call_context``, one hop only).
    forwards = True

    #: Health watch reconnect backoff, seconds (doubles from min to max).
    backoff_min = 0.2
    backoff_max = 5.0

    def __init__(
        self,
        config: RemoteService,
        env: Mapping[str, str] = {},
        *,
        shared_key: Optional[str] = None,
        max_message_bytes: int = ServerConfig.grpc_max_message_bytes,
        tls_ca: str = "",
    ) -> None:
        """``env``: where ``config.key_env`` is read; ``shared_key``: the front's
        own key, sent when the entry names none; ``tls_ca``: the roots
        (``server.grpc_tls_ca``) for an entry without its own ``tls_ca``."""
        if not config.target:
            raise ValueError("a remote service needs a target (host:port)")
        self.config = config
        self.name = f"remote:{config.name or config.target}"
        self.target = config.target
        self.timeouts = resolved_timeouts(config)
        self.max_message_bytes = max_message_bytes
        key: Optional[str]
        if config.key_env:
            key = env.get(config.key_env) or None
            if key is None:
                log.warning("%s: environment variable %s is not set; calling without a key", self.name,
                            config.key_env)
        else:
            key = config.key or shared_key or None
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {key}"),) if key else ()
        ca = config.tls_ca or tls_ca
        self._credentials = channel_credentials(ca, f"{self.name}: tls_ca") if ca else None
        self.health = HealthState.UNKNOWN
        #: Each transition into SERVING counts one (tests and logs).
        self.times_serving = 0
        self._channel: Optional[grpc.aio.Channel] = None
        self._stub: Optional[pb_grpc.InferenceServiceStub] = None
        self._watch_task: Optional[asyncio.Task] = None
        self._closed = False

    def __repr__(self) -> str:  # never the key
        return f"RemoteBackend({self.name!r}, {self.target!r})"

    # ------------------------------------------------------------ plumbing

    @property
    def serving(self) -> bool:
        """May it be sent new requests?  False while it drains or cannot be reached."""
        return self.health in (HealthState.UNKNOWN, HealthState.SERVING)

    def _options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Reconnect soon after the remote comes back (grpc's own backoff
            # grows to 120 s), and give up a connection attempt after
            # connect_timeout.
            ("grpc.initial_reconnect_backoff_ms", int(self.backoff_min * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.backoff_max * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(self.timeouts.connect_timeout * 1000)),
        ]

    def _get_stub(self) -> pb_grpc.InferenceServiceStub:
        if self._closed:
            raise Unavailable(f"{self.name}: closed")
        if self._stub is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, self._options())
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options())
            self._stub = pb_grpc.InferenceServiceStub(self._channel)
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name=f"{self.name} health")
        return self._stub

    async def start(self) -> None:
        """Open the channel and start watching health (else the first call does)."""
        self._get_stub()

    def _md(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_id), (call_context.FORWARDED_KEY, "1"), *self._metadata)

    def _error(self, e: grpc.aio.AioRpcError) -> BackendError:
        retry_after, retryable = None, False
        for key, value in e.trailing_metadata() or ():
            if key == RETRY_AFTER_KEY:
                retry_after = parse_retry_after(value if isinstance(value, str) else value.decode("latin-1"))
            elif key == RETRYABLE_KEY:
                retryable = value in ("1", b"1")
        details = e.details() or e.code().name
        if e.code() == grpc.StatusCode.UNAVAILABLE and details == SHUTTING_DOWN:
            # Draining, and the watch has not said so yet: no more new requests.
            self._set_health(HealthState.NOT_SERVING)
        return error_for_code(e.code(), f"{self.name}: {details}", retry_after, retryable)

    def _unary_timeout(self) -> float:
        budget = self.timeouts.connect_timeout + self.timeouts.first_token_timeout
        remaining = call_context.remaining()
        return budget if remaining is None else min(budget, remaining)

    async def _unary(self, method: str, request: Any, request_id: str = "") -> Any:
        """One unary InferenceService call (every method but Generate; a new
        RPC is one more line calling this)."""
        stub = self._get_stub()
        rid = request_id or call_context.request_id() or uuid.uuid4().hex
        try:
            return await getattr(stub, method)(request, timeout=self._unary_timeout(), metadata=self._md(rid))
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None

    # ------------------------------------------------------------ generate

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        stub = self._get_stub()
        call = stub.Generate(_outgoing(req), timeout=call_context.remaining(), metadata=self._md(req.request_id))
        clock = TokenClock(self.name, self.timeouts)
        loop = asyncio.get_running_loop()
        handed_at: Optional[float] = None
        try:
            while True:
                if handed_at is not None:
                    # The time our caller held the stream is not the remote's silence.
                    clock.extend(loop.time() - handed_at)
                    handed_at = None
                try:
                    msg = await clock.bound(call.read())
                except grpc.aio.AioRpcError as e:
                    raise self._error(e) from None
                if msg is grpc.aio.EOF:
                    raise Unavailable(f"{self.name}: the stream ended without its final message")
                event = event_from_pb(msg)
                if event is None:  # an event kind this version does not know
                    continue
                if isinstance(event, Done):
                    yield event
                    return
                clock.token()
                handed_at = loop.time()
                yield event
        finally:
            # Closed early (the caller went away), timed out or failed: the
            # remote sees the cancellation and stops generating.
            call.cancel()

    # ------------------------------------------------------------ unary

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        return EmbedResult.from_pb(await self._unary("Embed", _outgoing(req), req.request_id))

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        res = TokenCount.from_pb(await self._unary(
            "CountTokens", pb.CountTokensRequest(request=_outgoing(req)), req.request_id))
        res.backend = self.name
        return res

    async def list_models(self) -> list[ModelInfo]:
        res = await self._unary("ListModels", pb.ListModelsRequest())
        # Whatever the remote routes the name to, here it is this backend's.
        return [dataclasses.replace(ModelInfo.from_pb(m), backend=self.name, fallbacks=[]) for m in res.models]

    async def show_model(self, name: str) -> ModelShow:
        show = ModelShow.from_pb(await self._unary("ShowModel", pb.ShowModelRequest(model=name)))
        show.info.backend, show.info.fallbacks = self.name, []
        return show

    async def list_running(self) -> list[RunningModel]:
        res = await self._unary("ListRunning", pb.ListRunningRequest())
        return [dataclasses.replace(RunningModel.from_pb(m), backend=self.name) for m in res.models]

    async def load_model(self, name: str, keep_alive: Optional[float]) -> LoadResult:
        res = LoadResult.from_pb(await self._unary(
            "LoadModel", pb.LoadModelRequest(model=name, keep_alive=keep_alive_to_pb(keep_alive))))
        res.backend = self.name
        return res

    async def unload_model(self, name: str) -> bool:
        return (await self._unary("UnloadModel", pb.UnloadModelRequest(model=name))).was_loaded

    async def rerank(self, req: RerankRequest) -> RerankResult:
        res = RerankResult.from_pb(await self._unary("Rerank", req.to_pb(), req.request_id))
        res.backend = self.name
        return res

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult:
        res = TokenizeResult.from_pb(await self._unary("Tokenize", req.to_pb(), req.request_id))
        res.backend = self.name
        return res

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResult:
        res = DetokenizeResult.from_pb(await self._unary("Detokenize", req.to_pb(), req.request_id))
        res.backend = self.name
        return res

    # ------------------------------------------------------------ health

    def _set_health(self, state: HealthState, why: str = "") -> None:
        if state is self.health:
            return
        before, self.health = self.health, state
        if state is HealthState.SERVING:
            self.times_serving += 1
            log.info("%s (%s): serving", self.name, self.target)
        elif state is HealthState.NOT_SERVING:
            log.info("%s (%s): not serving (draining): no new requests go there", self.name, self.target)
        elif before is not HealthState.UNKNOWN or why:
            log.warning("%s (%s): unreachable%s; retrying", self.name, self.target, f" ({why})" if why else "")

    async def _watch(self) -> None:
        assert self._channel is not None
        stub = health_pb2_grpc.HealthStub(self._channel)
        backoff = self.backoff_min
        while True:
            try:
                watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
                async for resp in watch:
                    serving = resp.status == health_pb2.HealthCheckResponse.SERVING
                    self._set_health(HealthState.SERVING if serving else HealthState.NOT_SERVING)
                    backoff = self.backoff_min
                self._set_health(HealthState.UNREACHABLE, "the health stream ended")
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # No health service there: say nothing about it, and ask rarely.
                    self._set_health(HealthState.UNKNOWN)
                    backoff = self.backoff_max
                else:
                    self._set_health(HealthState.UNREACHABLE, f"{e.code().name}: {(e.details() or '')[:200]}")
            except Exception:
                log.exception("%s: health watch failed", self.name)
                self._set_health(HealthState.UNREACHABLE)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.backoff_max)

    async def close(self) -> None:
        self._closed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
            self._watch_task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
