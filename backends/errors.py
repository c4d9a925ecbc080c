"""Backend errors, each bound to the gRPC status it becomes.

Backends raise these; the inference service turns them into a gRPC status with
the same message, and the HTTP front maps that status onto its dialect (see
the error table in docs/architecture.md, "Errors").  Anything else that
escapes a backend becomes INTERNAL with a generic message, never a traceback.
"""

from __future__ import annotations

import grpc


class BackendError(Exception):
    """Base: carries the gRPC status code a caller should see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: True when another backend may be tried for the same request.
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BackendError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class TakesNoImages(InvalidArgument):
    """Images sent to a text-only model: a 400 for the caller, yet the router
    first tries the next backend that has the model (an upstream Ollama or a
    cloud may take images)."""

    retryable = True

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model} does not take images")


class ModelNotFound(BackendError):
    code = grpc.StatusCode.NOT_FOUND
    retryable = True


class Unavailable(BackendError):
    """The backend cannot serve now (down, failed to load, out of memory)."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class ResourceExhausted(BackendError):
    """Too busy, or rate limited upstream; retry_after in seconds if known."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(BackendError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Unauthenticated(BackendError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BackendError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(BackendError):
    code = grpc.StatusCode.UNIMPLEMENTED
    retryable = True


class Internal(BackendError):
    code = grpc.StatusCode.INTERNAL


#: Trailing metadata key carrying ``ResourceExhausted.retry_after`` (whole
#: seconds): the service sets it, the HTTP front turns it into Retry-After and
#: the remote backend reads it back.
RETRY_AFTER_KEY = "retry-after"

#: Trailing metadata key set (to "1") on an error that is retryable though
#: its code alone reads as final (``TakesNoImages``: INVALID_ARGUMENT, yet the
#: router tries the next backend): a remote service's router moves on past it
#: as the local one does.
RETRYABLE_KEY = "x-mlxgate-retryable"

#: The classes above, each bound to its code: the service's direction
#: (exception -> status) read backwards.
_CLASSES: tuple[type[BackendError], ...] = (
    InvalidArgument, ModelNotFound, Unavailable, ResourceExhausted, DeadlineExceeded,
    Unauthenticated, PermissionDenied, Unimplemented,
)
_OF_CODE: dict[grpc.StatusCode, type[BackendError]] = {cls.code: cls for cls in _CLASSES}
#: Codes no class of ours raises: as the HTTP front reads them (400 for the
#: first three), and the server-side failures as a failing upstream
#: (Unavailable: another backend may answer), as ``error_for_status`` does a 5xx.
_OF_CODE.update({
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: InvalidArgument,
    grpc.StatusCode.INTERNAL: Unavailable,
    grpc.StatusCode.UNKNOWN: Unavailable,
    grpc.StatusCode.DATA_LOSS: Unavailable,
    grpc.StatusCode.ABORTED: Unavailable,
    # Not our cancellation (that is a CancelledError here): the other side
    # ended the call, e.g. a server stopping.
    grpc.StatusCode.CANCELLED: Unavailable,
})


def retry_trailers(e: BackendError) -> tuple[tuple[str, str], ...]:
    """``RETRYABLE_KEY`` for an error that is retryable though its code read
    back (``error_for_code``) would not be; nothing otherwise."""
    if e.retryable and not _OF_CODE.get(e.code, Unavailable).retryable:
        return ((RETRYABLE_KEY, "1"),)
    return ()


def error_for_code(code: grpc.StatusCode, message: str, retry_after: float | None = None,
                   retryable: bool = False) -> BackendError:
    """The BackendError for a gRPC status another mlxgate service answered:
    the table above, reversed (docs/architecture.md, "Errors").  ``retry_after``
    (from the ``retry-after`` trailer) is kept on ResourceExhausted; without it
    a RESOURCE_EXHAUSTED stays trailer-less (gRPC's own "message larger than
    max"), which the front answers 413.  ``retryable`` (the ``RETRYABLE_KEY``
    trailer) makes the error retryable whatever its code."""
    cls = _OF_CODE.get(code, Unavailable)
    err = ResourceExhausted(message, retry_after=retry_after) if cls is ResourceExhausted else cls(message)
    if retryable:
        err.retryable = True
    return err
