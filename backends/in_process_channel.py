"""The in-process channel: the HTTP front calling the inference service of its
own process without gRPC's transport.

``mlxgate serve`` runs the front and the service in one process.  Through a
gRPC channel each request costs serializing and parsing every message, HTTP/2
framing, socket writes and reads, and grpc's poller thread waking the event
loop (about 40 % of the process's CPU per request, measured with py-spy on an
instant upstream).  ``LocalStub`` hands the very same ``mlxgate.v1`` messages
to the very same method handlers (``backends.service.method_handlers``: the
gate's run and in-flight count, the contract validation, the router) on the
same event loop, and gives the front objects that behave like grpc.aio's
calls.  The proto stays the only contract between the front and the service:
the front builds ``pb`` requests and reads ``pb`` events; it only holds this
stub instead of a ``grpc.aio`` one.  The gRPC port still serves every other
client (polyglot clients, fronts in other processes).

What a gRPC call does and this one does too:

- the gate's admission (``Gate.refusal``: API keys, admin keys for the
  model-management methods, the drain with the front's pass) before the
  handler runs;
- the deadline: ``time_remaining()`` for the service, DEADLINE_EXCEEDED
  "Deadline Exceeded" for the caller when it passes (the handler is
  cancelled, as grpc cancels it);
- cancellation: ``cancel()`` cancels the handler's task (the servicer closes
  the backend's generator); a read then raises ``asyncio.CancelledError``; a
  reader that is itself cancelled cancels the call (as grpc.aio does);
- statuses: what the handler sets with ``set_code`` / ``set_details`` /
  ``set_trailing_metadata`` reaches the caller as ``grpc.aio.AioRpcError``
  after the messages written before it;
- message size: a request or response larger than ``max_message_bytes`` is
  RESOURCE_EXHAUSTED "... message larger than max (N vs. M)", gRPC's own
  words for each direction (the front turns it into 413);
- flow control: ``context.write`` waits while ``WINDOW`` messages are unread,
  so a slow HTTP client holds the backend back as an HTTP/2 window would.

One thing more than grpc.aio: ``ready()`` says whether a read would wait, so
the front writes the events already here in one write.

No bytes: messages are passed as objects.  The front never changes a request
after the call, nor the service an event after writing it.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Callable, Optional, Sequence

import grpc

from backends.gate import Gate

#: Unread messages a stream may hold before ``context.write`` waits.
WINDOW = 16

_OK = grpc.StatusCode.OK
Metadata = Sequence[tuple[str, str]]


def _too_large_answer(size: int, limit: int) -> str:
    """What gRPC says of an answer over the limit (the server's send check
    comes first, the front's channel having the same limit)."""
    return f"SERVER: Sent message larger than max ({size} vs. {limit})"


class _Context:
    """What the method handlers use of ``grpc.aio.ServicerContext``."""

    __slots__ = ("_call", "_metadata")

    def __init__(self, call: "_Call", metadata: Metadata) -> None:
        self._call = call
        self._metadata = metadata

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> Optional[float]:
        deadline = self._call._deadline
        if deadline is None:
            return None
        return max(0.0, deadline - self._call._loop.time())

    def set_code(self, code: grpc.StatusCode) -> None:
        if not self._call._final:
            self._call._code = code

    def set_details(self, details: str) -> None:
        if not self._call._final:
            self._call._details = details

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self._call._trailing = tuple(metadata)

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        self._call._initial = tuple(metadata)

    def code(self) -> grpc.StatusCode:
        return self._call._code

    def details(self) -> str:
        return self._call._details

    def peer(self) -> str:
        return "local:in-process"

    async def write(self, message: Any) -> None:
        await self._call._push(message)


class _Call:
    """One call: the handler runs in its own task (as grpc.aio runs it)."""

    def __init__(
        self,
        handle: Callable[[Any, Any], Any],
        request: Any,
        timeout: Optional[float],
        metadata: Metadata,
        gate: Gate,
        max_message_bytes: int,
        method: str = "",
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._code = _OK
        self._details = ""
        self._trailing: tuple[tuple[str, str], ...] = ()
        self._initial: tuple[tuple[str, str], ...] = ()
        #: The status can no longer change (the call ended, or its deadline passed).
        self._final = False
        self._cancelled = False
        self._result: Any = None
        self._max = max_message_bytes
        self._deadline = None if timeout is None else self._loop.time() + timeout
        self._timer: Optional[asyncio.TimerHandle] = None
        self._task: Optional[asyncio.Task] = None
        refusal = gate.refusal(metadata, method)
        size = request.ByteSize()
        if refusal is not None:
            self._end(*refusal)
        elif size > max_message_bytes:
            self._end(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"Sent message larger than max ({size} vs. {max_message_bytes})")
        else:
            self._task = self._loop.create_task(self._run(handle, request, _Context(self, metadata)))
            if timeout is not None:
                self._timer = self._loop.call_at(self._deadline, self._expire)

    # ------------------------------------------------------------ service side

    async def _run(self, handle: Callable[[Any, Any], Any], request: Any, context: _Context) -> None:
        try:
            result = await handle(request, context)
            if result is not None and self._code == _OK and result.ByteSize() > self._max:
                self._end(grpc.StatusCode.RESOURCE_EXHAUSTED, _too_large_answer(result.ByteSize(), self._max))
                return
            self._result = result
            self._end(self._code, self._details)
        except asyncio.CancelledError:
            self._end(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        except Exception as e:  # noqa: BLE001 - grpc answers UNKNOWN for an error a handler let out
            self._end(grpc.StatusCode.UNKNOWN, f"Unexpected error in RPC handling: {type(e).__name__}")

    def _expire(self) -> None:
        if not self._final:
            self._end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            if self._task is not None:
                self._task.cancel()

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        if self._final:
            return
        self._final = True
        self._code, self._details = code, details
        if self._timer is not None:
            self._timer.cancel()
        self._wake()

    def _wake(self) -> None:
        raise NotImplementedError

    async def _push(self, message: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ caller side

    def _error(self) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            self._code, grpc.aio.Metadata(*self._initial), grpc.aio.Metadata(*self._trailing), details=self._details
        )

    def done(self) -> bool:
        return self._final

    async def initial_metadata(self) -> grpc.aio.Metadata:
        """What the handler sent with ``send_initial_metadata`` (read after the first message)."""
        return grpc.aio.Metadata(*self._initial)

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        if self._final:
            return False
        self._cancelled = True
        self._end(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        if self._task is not None:
            self._task.cancel()
        return True

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class LocalUnaryCall(_Call):
    """An awaitable unary call (``await stub.Embed(...)``)."""

    _waiter: Optional[asyncio.Future] = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            if self._cancelled:
                w.cancel()
            else:
                w.set_result(None)

    async def _push(self, message: Any) -> None:  # pragma: no cover - unary handlers return their answer
        raise RuntimeError("a unary call writes no messages")

    async def _wait(self) -> Any:
        if not self._final:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                self._waiter = None
        if self._cancelled:
            raise asyncio.CancelledError()
        if self._code != _OK:
            raise self._error()
        return self._result

    def __await__(self) -> Any:
        return self._wait().__await__()


class LocalStreamCall(_Call):
    """A server stream: ``read()`` gives each message, then ``grpc.aio.EOF``."""

    def __init__(self, *args: Any) -> None:
        self._queue: collections.deque = collections.deque()
        self._first_handed = False
        self._reader: Optional[asyncio.Future] = None
        self._space: Optional[asyncio.Future] = None
        super().__init__(*args)

    def _wake(self) -> None:
        r = self._reader
        if r is not None and not r.done():
            if self._cancelled:
                r.cancel()
            else:
                r.set_result(None)
        s = self._space
        if s is not None and not s.done():
            s.set_result(None)

    async def _push(self, message: Any) -> None:
        if self._final:
            # Ended (cancelled, deadline): the handler's task is being cancelled too.
            raise asyncio.CancelledError()
        size = message.ByteSize()
        if size > self._max:
            self._end(grpc.StatusCode.RESOURCE_EXHAUSTED, _too_large_answer(size, self._max))
            raise asyncio.CancelledError()
        self._queue.append(message)
        r = self._reader
        if r is not None and not r.done():
            r.set_result(None)
        if not self._first_handed:
            # The first message reaches the reader before the handler goes on
            # (as grpc sends it): the front writes the first token while the
            # backend makes the rest, instead of after the whole answer.
            self._first_handed = True
            await asyncio.sleep(0)
        while len(self._queue) >= WINDOW and not self._final:
            self._space = self._loop.create_future()
            try:
                await self._space
            finally:
                self._space = None

    def ready(self) -> bool:
        """``read()`` would not wait: a message is queued, or the call ended."""
        return bool(self._queue) or self._final

    async def read(self) -> Any:
        while True:
            if self._cancelled:
                raise asyncio.CancelledError()
            if self._queue:
                message = self._queue.popleft()
                s = self._space
                if s is not None and not s.done() and len(self._queue) < WINDOW:
                    s.set_result(None)
                return message
            if self._final:
                if self._code == _OK:
                    return grpc.aio.EOF
                raise self._error()
            self._reader = self._loop.create_future()
            try:
                await self._reader
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                self._reader = None


class _RequestStream:
    """A client stream's messages (``CreateBlob``) as the handler reads them:
    each checked against the message size limit as it is read, as gRPC's
    receiving side checks it."""

    def __init__(self, messages: Any, max_message_bytes: int) -> None:
        self._messages = messages.__aiter__()
        self._max = max_message_bytes

    def ByteSize(self) -> int:  # noqa: N802 - the protobuf name the call checks
        return 0  # each message is checked when read

    def __aiter__(self) -> "_RequestStream":
        return self

    async def __anext__(self) -> Any:
        from backends.errors import ResourceExhausted

        message = await self._messages.__anext__()
        size = message.ByteSize()
        if size > self._max:
            raise ResourceExhausted(f"Received message larger than max ({size} vs. {self._max})")
        return message


class LocalStub:
    """``mlxgate.v1.InferenceService``'s methods over ``handlers`` (the
    service's ``method_handlers``), called the way ``InferenceServiceStub``'s
    are: ``stub.Generate(request, timeout=..., metadata=...)``."""

    def __init__(self, handlers: dict[str, Any], gate: Gate, max_message_bytes: int) -> None:
        for name, h in handlers.items():
            cls = LocalStreamCall if h.streaming else LocalUnaryCall
            method = self._method(cls, h.handle, gate, max_message_bytes, name)
            if h.client_streaming:
                method = self._upload(method, max_message_bytes)
            setattr(self, name, method)

    @staticmethod
    def _upload(method: Callable[..., Any], max_bytes: int) -> Callable[..., Any]:
        def call(messages: Any, timeout: Optional[float] = None, metadata: Metadata = ()) -> Any:
            return method(_RequestStream(messages, max_bytes), timeout=timeout, metadata=metadata)

        return call

    @staticmethod
    def _method(cls: type[_Call], handle: Callable[[Any, Any], Any], gate: Gate, max_bytes: int,
                name: str) -> Callable[..., Any]:
        def call(request: Any, timeout: Optional[float] = None, metadata: Metadata = ()) -> Any:
            return cls(handle, request, timeout, metadata, gate, max_bytes, name)

        return call
