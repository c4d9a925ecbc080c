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
