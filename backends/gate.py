"""The gRPC service's door: API keys, draining, in-flight calls, malformed messages.

Every ``mlxgate.v1.InferenceService`` call passes ``GateInterceptor`` first:

- **Keys.** When API keys are configured, a call must carry metadata
  ``authorization: Bearer <key>``; otherwise it ends UNAUTHENTICATED before its
  request is even parsed.  The presented key is compared with every configured
  key in constant time (``hmac.compare_digest``, no early exit) and is never
  logged.  The standard health service and reflection stay open.  The
  model-management methods (``mlxgate.admin.ADMIN_METHODS``: create, copy,
  delete, pull, blobs) need an admin key then, else PERMISSION_DENIED; admin
  keys are valid for every other method too.
- **Who.**  The key is looked up in the one key table (``mlxgate.keyring``):
  ``identify`` names the caller (``NamedKey``) for the service's limits and
  ledger.  A call from this process's HTTP front (its ``front_token``) or
  made with an admin key may name the caller it speaks for in
  ``x-mlxgate-caller`` (a key name, never a secret): the front checked that
  caller's key itself.
- **Draining.** After ``begin_drain()`` (SIGTERM/SIGINT) new calls end
  UNAVAILABLE "server shutting down".  Calls from this process's own HTTP
  front (they carry the per-process ``front_token``) are still admitted: the
  front refuses new HTTP requests itself, so a front call during the drain
  belongs to an HTTP request that was already in flight.

The service's method handlers (``backends.service``) run each call through
``Gate.run``, which counts it in flight so the shutdown can wait for it, and
after the grace period ``end_all()`` ends the calls still running with
UNAVAILABLE "server shutting down".

Malformed messages: ``deserializer`` never raises (grpcio would answer
UNKNOWN and log a traceback per call); it hands the handler a ``Malformed``
marker instead, which ``Gate.reject_malformed`` turns into INVALID_ARGUMENT
with at most one warning line every ``MALFORMED_LOG_INTERVAL`` seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Optional, Sequence

import grpc

from mlxgate.admin import NEEDS_ADMIN, is_admin_method
from mlxgate.keyring import KeyRing, NamedKey
from mlxgate.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
_METHOD_PREFIX = f"/{SERVICE_NAME}/"

#: Metadata key carrying the per-process token of the in-process HTTP front.
FRONT_TOKEN_KEY = "x-mlxgate-front"
#: Metadata naming the key of the caller a front speaks for (a name, not a secret).
CALLER_KEY = "x-mlxgate-caller"

SHUTTING_DOWN = "server shutting down"

#: At most one "malformed request" warning per this many seconds.
MALFORMED_LOG_INTERVAL = 10.0


def metadata_value(metadata: Optional[Iterable[Any]], key: str) -> Optional[str]:
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            return v.decode("latin-1") if isinstance(v, bytes) else v
    return None


class Malformed:
    """What the deserializer hands the handler when the bytes do not parse."""

    __slots__ = ("type_name", "reason")

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason


def deserializer(message_type: Any) -> Callable[[bytes], Any]:
    """``message_type.FromString`` that returns ``Malformed`` instead of raising."""
    from_string = message_type.FromString
    type_name = message_type.DESCRIPTOR.name

    def parse(data: bytes) -> Any:
        try:
            return from_string(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and whatever upb raises on bad bytes
            return Malformed(type_name, str(e)[:200] or type(e).__name__)

    return parse


class RateLimitedWarning:
    """Log a warning at most once per ``interval`` seconds, counting the rest."""

    def __init__(
        self, logger: logging.Logger, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: Optional[float] = None
        self.suppressed = 0

    def __call__(self, msg: str, *args: Any) -> bool:
        """True when this one was logged."""
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += f" ({self.suppressed} more since the last such warning)"
        self.logger.warning(msg, *args)
        self._last = now
        self.suppressed = 0
        return True


class Gate:
    """Keys, the drain flag and the calls in flight of one gRPC server."""

    def __init__(
        self, api_keys: Sequence[str] = (), front_token: Optional[str] = None, keyring: Optional[KeyRing] = None
    ) -> None:
        """``keyring``: the key table; default: ``api_keys`` as plain keys."""
        self.keyring = keyring if keyring is not None else KeyRing.of(api_keys)
        self._front_token = front_token.encode() if front_token else None
        self.draining = False
        self._calls: dict[asyncio.Task, bool] = {}  # running call -> ended by end_all()
        self._idle = asyncio.Event()
        self._idle.set()
        self.malformed_warning = RateLimitedWarning(log, MALFORMED_LOG_INTERVAL)

    # ------------------------------------------------------------ admission

    @staticmethod
    def _matches(presented: bytes, candidates: Sequence[bytes]) -> bool:
        ok = False
        for c in candidates:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(presented, c)
        return ok

    def _presented(self, metadata: Optional[Iterable[Any]]) -> tuple[bool, Optional[NamedKey]]:
        """(a key was presented, the configured key it is)."""
        auth = metadata_value(metadata, "authorization")
        if auth is None:
            return False, None
        scheme, _, key = auth.strip().partition(" ")
        if scheme.lower() != "bearer":
            return True, None
        return True, self.keyring.lookup(key)

    def identify(self, metadata: Optional[Iterable[Any]]) -> Optional[NamedKey]:
        """The caller's key (None: no keys configured, or none presented):
        the one named in ``x-mlxgate-caller`` when the front or an admin
        key vouches for it, else the presented one."""
        _, key = self._presented(metadata)
        named = metadata_value(metadata, CALLER_KEY)
        if named is not None and ((key is not None and key.admin) or self._from_front(metadata)):
            return self.keyring.by_name(named) or key
        return key

    def refusal(
        self, metadata: Optional[Iterable[Any]], method: str = ""
    ) -> Optional[tuple[grpc.StatusCode, str]]:
        """Why a new InferenceService call of ``method`` (its name or full
        path) must be refused, or None to admit it."""
        if self.keyring.required:
            presented, key = self._presented(metadata)
            if not presented:
                return grpc.StatusCode.UNAUTHENTICATED, (
                    "missing API key: send metadata 'authorization: Bearer <key>'"
                )
            if key is None:
                return grpc.StatusCode.UNAUTHENTICATED, "invalid API key"
            if is_admin_method(method) and not key.admin:
                return grpc.StatusCode.PERMISSION_DENIED, NEEDS_ADMIN
        if self.draining and not self._from_front(metadata):
            return grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN
        return None

    def _from_front(self, metadata: Optional[Iterable[Any]]) -> bool:
        if self._front_token is None:
            return False
        token = metadata_value(metadata, FRONT_TOKEN_KEY)
        return token is not None and self._matches(token.encode(), [self._front_token])

    # ------------------------------------------------------------ running calls

    def reject_malformed(self, request: Malformed, context: grpc.aio.ServicerContext) -> None:
        """Set INVALID_ARGUMENT on the call; the handler then returns.

        Never ``context.abort()`` in this service: grpc.aio keeps an aborted
        call's request alive (backends/servicer.py, ``_fail``)."""
        self.malformed_warning(
            "malformed %s from %s answered INVALID_ARGUMENT: %s", request.type_name, context.peer(), request.reason
        )
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(f"malformed {request.type_name}: {request.reason}")

    async def run(self, work: Awaitable[Any], context: grpc.aio.ServicerContext) -> Any:
        """Run one call's work in the call's own task, counted in flight; when
        ``end_all()`` cancels it, the call ends UNAVAILABLE "server shutting down".

        No task of its own: the work is awaited in place (a task more per
        call was a loop turn between the last message and the call's end)."""
        task = asyncio.current_task()
        assert task is not None
        self._calls[task] = False
        self._idle.clear()
        try:
            return await work
        except asyncio.CancelledError:
            # Ended by end_all() alone (no other cancel pending on the task):
            # a status and a plain return (no abort()).
            if self._calls.get(task) and task.uncancel() == 0:
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(SHUTTING_DOWN)
                return None
            raise
        finally:
            self._calls.pop(task, None)
            if not self._calls:
                self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    # ------------------------------------------------------------ shutdown

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: Optional[float]) -> bool:
        """Wait until no call runs; False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def end_all(self) -> int:
        """End every running call with UNAVAILABLE; returns how many."""
        for task in self._calls:
            self._calls[task] = True
            task.cancel()
        return len(self._calls)


def _refusing(handler: Optional[grpc.RpcMethodHandler], code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call at once; the request is never parsed."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        context.set_code(code)
        context.set_details(details)
        return b""  # no serializer: raw bytes; never sent with a non-OK status

    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Applies ``Gate.refusal`` to every InferenceService call; others pass."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Optional[grpc.RpcMethodHandler]]],
        details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = await continuation(details)
        if not details.method.startswith(_METHOD_PREFIX):
            return handler
        refusal = self.gate.refusal(details.invocation_metadata, details.method)
        if refusal is None:
            return handler
        return _refusing(handler, *refusal)
