"""The one error table of the HTTP front, and each dialect's error body.

Every failure the front reports goes through ``ApiError``: validation errors
are raised as ``ApiError`` directly, gRPC failures are converted with
``from_grpc`` (the table in docs/architecture.md, "Errors"), aiohttp's own HTTP exceptions (404,
405 with its ``Allow`` header, 413) with ``from_http``; the refusals of the
trust middleware (``gateway/security.py``: 401, 403) are ``ApiError`` too.
``ollama_body`` / ``openai_body`` / ``anthropic_body`` render it in the
caller's dialect; which dialect a request speaks is decided by its path
(``/v1/messages`` and below is Anthropic, the rest of ``/v1/...`` and vLLM's
rerank and tokenize paths OpenAI, everything else Ollama), except that
``anthropic-version`` makes ``/v1/models`` Anthropic's (``request_dialect``).

The Anthropic dialect answers only the statuses Anthropic documents
(``adapt``): a busy engine (RESOURCE_EXHAUSTED) and an unavailable service
(UNAVAILABLE, the drain's 503) are 529 ``overloaded_error`` -- temporary,
retried by Anthropic's SDKs and Claude Code, and not a rate limit on the
caller's key (Anthropic's 429 means that; a key's own rate or budget limit
is a 429 in every dialect); DEADLINE_EXCEEDED is 504 ``timeout_error``; UNIMPLEMENTED (a model
whose backend cannot count tokens) is 400 ``invalid_request_error``, since
retrying cannot help and Anthropic has no 501; so is a body that did not
arrive in time (408 elsewhere; Anthropic documents no 408).

RESOURCE_EXHAUSTED means two things: the engine is busy (the service adds a
``retry-after`` trailer; 429, or Ollama's 503 "server busy"), or grpc itself
refused a message over the size limit ("Received/Sent message larger than
max", no trailer), which is 413 in every dialect.

Messages of mapped statuses (INVALID_ARGUMENT, NOT_FOUND, ...) are the
backend's own clear messages and are passed through.  Anything not in the
table becomes 500 with a generic message naming the request id; the details
are logged, never sent.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping, Optional

import grpc
from aiohttp import web

from gateway.render import json_response
from mlxgate.dialects import anthropic
from mlxgate.limits import clip

#: Must match backends.errors.RETRY_AFTER_KEY (the front does not import backends).
RETRY_AFTER_KEY = "retry-after"
#: Must match backends.spend.spend.LIMIT_KEY: a RESOURCE_EXHAUSTED that is the
#: caller's own limit ("budget" or "rate"), not a busy server.
LIMIT_KEY = "x-mlxgate-limit"
#: The codes such a 429 carries in the OpenAI dialect (OpenAI's own).
LIMIT_CODES = {"budget": "insufficient_quota", "rate": "rate_limit_exceeded"}

log = logging.getLogger(__name__)

Dialect = Literal["ollama", "openai", "anthropic"]

#: gRPC status -> HTTP status (docs/architecture.md, "Errors").
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.CANCELLED: 499,
}

#: What grpc core says when a message exceeds grpc.max_{send,receive}_message_length.
_MESSAGE_TOO_LARGE = "message larger than max"

#: What real Ollama answers (HTTP 503) when its queue is full.
OLLAMA_BUSY = "server busy, please try again.  maximum pending requests exceeded"

#: HTTP status -> OpenAI error ``type``.
_OPENAI_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    501: "invalid_request_error",
    # A CANCELLED the caller sees was not its own doing (it would be gone).
    499: "server_error",
}


class ApiError(Exception):
    """An error answer: HTTP status plus what every dialect needs to render it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        grpc_code: Optional[grpc.StatusCode] = None,
        retry_after: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        limit: Optional[str] = None,
    ) -> None:
        message = clip(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.grpc_code = grpc_code
        #: Seconds, as the Retry-After header wants them (from the service's trailers).
        self.retry_after = retry_after
        #: More response headers (``Allow`` on 405, ``WWW-Authenticate`` on 401).
        self.headers = dict(headers) if headers else {}
        #: "budget" or "rate": the caller's limit (a 429 in every dialect).
        self.limit = limit


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param)


def internal_error(request_id: str = "") -> ApiError:
    suffix = f" (request id {request_id})" if request_id else ""
    return ApiError(500, f"internal server error{suffix}", grpc_code=grpc.StatusCode.INTERNAL)


def from_grpc(err: grpc.aio.AioRpcError, request_id: str = "") -> ApiError:
    """Map a failed gRPC call onto the table; unknown codes become a generic 500."""
    code = err.code()
    status = GRPC_TO_HTTP.get(code)
    if status is None:
        log.error("gRPC call failed (request %s): %s %s", request_id, code, err.details())
        return internal_error(request_id)
    message = err.details() or code.name.lower().replace("_", " ")
    trailers = dict(err.trailing_metadata() or ())
    retry_after = trailers.get(RETRY_AFTER_KEY)
    limit = trailers.get(LIMIT_KEY)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and limit in LIMIT_CODES:
        headers = {k: v for k, v in trailers.items() if isinstance(v, str) and k.startswith("x-ratelimit-")}
        return ApiError(429, message, code=LIMIT_CODES[limit], grpc_code=code, retry_after=retry_after,
                        headers=headers, limit=limit)
    api_code = None
    if code == grpc.StatusCode.NOT_FOUND and "model" in message.lower():
        api_code = "model_not_found"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if retry_after is None and _MESSAGE_TOO_LARGE in message:
            return ApiError(
                413,
                f"request or response too large for the inference service ({message})",
                code="request_too_large",
                grpc_code=code,
            )
        api_code = "rate_limit_exceeded"
    return ApiError(status, message, code=api_code, grpc_code=code, retry_after=retry_after)


def from_http(exc: web.HTTPException, path: str) -> ApiError:
    """aiohttp's own errors (unknown route, wrong method, body too large)."""
    status = exc.status
    if status == 404:
        if path.startswith(ANTHROPIC_PREFIX + "/batches"):
            return ApiError(404, f"not found: no route for {path} (Anthropic's Message Batches API is not served; "
                                 "send each request to POST /v1/messages)", code="not_found")
        return ApiError(404, f"not found: no route for {path}", code="not_found")
    if status == 405:
        # OPTIONS is answered on every route by the trust middleware.
        allowed = set(getattr(exc, "allowed_methods", ()) or ()) | {"OPTIONS"}
        allow = ", ".join(sorted(allowed))
        return ApiError(405, f"method not allowed for {path}", headers={"Allow": allow})
    if status == 413:
        return ApiError(413, f"request body too large: {exc.text or 'limit exceeded'}")
    return ApiError(status, exc.reason or "request failed")


#: Paths of the Anthropic dialect: /v1/messages and everything below it.
ANTHROPIC_PREFIX = "/v1/messages"


#: vLLM's paths outside /v1 (rerank, tokenize): vLLM answers errors in OpenAI's shape there.
VLLM_PATHS = frozenset({"/rerank", "/v2/rerank", "/tokenize", "/detokenize"})


def dialect_of(path: str) -> Dialect:
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return "anthropic"
    return "openai" if path == "/v1" or path.startswith("/v1/") or path in VLLM_PATHS else "ollama"


#: Paths both OpenAI's API and Anthropic's serve: ``GET /v1/models`` and ``/v1/models/{id}``.
SHARED_MODELS_PATH = "/v1/models"
#: The header every Anthropic client sends (the API requires it); no OpenAI client does.
ANTHROPIC_VERSION_HEADER = "anthropic-version"


def request_dialect(request: web.BaseRequest) -> Dialect:
    """The dialect a request speaks: by its path, except on the paths both
    APIs share, where ``anthropic-version`` marks an Anthropic client."""
    dialect = dialect_of(request.path)
    if dialect == "openai" and ANTHROPIC_VERSION_HEADER in request.headers and (
        request.path == SHARED_MODELS_PATH or request.path.startswith(SHARED_MODELS_PATH + "/")
    ):
        return "anthropic"
    return dialect


#: Anthropic dialect: our status -> the one Anthropic documents (see the module docstring).
_ANTHROPIC_STATUS = {429: 529, 503: 529, 501: 400, 408: 400}


def adapt(err: ApiError, dialect: Dialect) -> ApiError:
    """Dialect-specific adjustments of status and text (Ollama's busy answer,
    Anthropic's statuses)."""
    if err.limit is not None:  # the caller's budget or rate limit: 429 everywhere
        return err
    if dialect == "ollama" and err.status == 429 and err.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(
            503, OLLAMA_BUSY, grpc_code=err.grpc_code, retry_after=err.retry_after, headers=err.headers
        )
    if dialect == "anthropic" and err.status in _ANTHROPIC_STATUS:
        return ApiError(
            _ANTHROPIC_STATUS[err.status], err.message, param=err.param, code=err.code, grpc_code=err.grpc_code,
            retry_after=err.retry_after, headers=err.headers,
        )
    return err


def ollama_body(err: ApiError) -> dict[str, Any]:
    return {"error": err.message}


def openai_type(status: int) -> str:
    if status in _OPENAI_TYPES:
        return _OPENAI_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_body(err: ApiError) -> dict[str, Any]:
    return {
        "error": {
            "message": err.message,
            "type": openai_type(err.status),
            "param": err.param,
            "code": err.code,
        }
    }


def anthropic_body(err: ApiError) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}`` (after ``adapt``)."""
    return {"type": "error", "error": {"type": anthropic.error_type(err.status), "message": err.message}}


def body_for(err: ApiError, dialect: Dialect) -> dict[str, Any]:
    if dialect == "openai":
        return openai_body(err)
    if dialect == "anthropic":
        return anthropic_body(err)
    return ollama_body(err)


def error_response(err: ApiError, dialect: Dialect) -> web.Response:
    err = adapt(err, dialect)
    # 499 is not a registered HTTP reason; aiohttp needs one spelled out.
    reason = "Client Closed Request" if err.status == 499 else None
    headers = dict(err.headers)
    if err.retry_after:
        headers["Retry-After"] = err.retry_after
    return json_response(body_for(err, dialect), status=err.status, reason=reason, headers=headers)
