"""How the inference service uses ``Spend``: admission, one tracker per
Generate (as the metrics' ``GenerateTracker``), embeddings, ``GetUsage``.

The caller is the call's key name (``backends.call_context.key``, set from the
gate's ``identify``), looked up in the key table for its limits.  A stream
cut short (cancelled, failed mid-way) counts what it had streamed: the
backend and model from its first chunk, a token per token id (or per chunk
when a backend sends text without ids) as completion tokens.  A request no
backend answered is not recorded.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from backends import call_context
from backends.errors import InvalidArgument, PermissionDenied
from backends.spend.ledger import GROUPS
from backends.spend.spend import Spend
from backends.types import Done, EmbedResult, GenerateRequest
from mlxgate.admin import USAGE_NEEDS_ADMIN
from mlxgate.keyring import NamedKey
from mlxgate.v1 import inference_pb2 as pb

#: Metadata naming the dialect a front's caller spoke ("ollama", "openai", "anthropic").
DIALECT_KEY = "x-mlxgate-dialect"


class SpendTracker:
    __slots__ = ("spend", "key", "dialect", "backend", "model", "tokens")

    def __init__(self, spend: Spend, key: Optional[NamedKey], dialect: str) -> None:
        self.spend = spend
        self.key = key
        self.dialect = dialect
        self.backend = ""
        self.model = ""
        self.tokens = 0

    def answering(self, backend: str, model: str) -> None:
        self.backend, self.model = backend, model

    def chunk(self, n_tokens: int) -> None:
        self.tokens += n_tokens

    def finish(self, done: Optional[Done], error_code: Optional[str], cancelled: bool) -> None:
        if done is not None and done.backend:
            self.spend.finished(self.key, self.dialect, done.backend, done.model or self.model, done.prompt_tokens,
                                done.completion_tokens, done.cached_prompt_tokens, done.finish_reason)
        elif self.backend:
            outcome = "cancelled" if cancelled else f"error:{error_code or 'UNKNOWN'}"
            self.spend.finished(self.key, self.dialect, self.backend, self.model, 0, self.tokens, 0, outcome)


class _Both:
    """Two trackers as one (the metrics' and the spend's)."""

    __slots__ = ("a", "b")

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def answering(self, backend: str, model: str) -> None:
        self.a.answering(backend, model)
        self.b.answering(backend, model)

    def chunk(self, n_tokens: int) -> None:
        self.a.chunk(n_tokens)
        self.b.chunk(n_tokens)

    def finish(self, done: Optional[Done], error_code: Optional[str], cancelled: bool) -> None:
        try:
            self.a.finish(done, error_code, cancelled)
        finally:
            self.b.finish(done, error_code, cancelled)


class _BothObservers:
    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def start(self, req: GenerateRequest) -> Any:
        return _Both(self.a.start(req), self.b.start(req))


def both(observer: Any, spend: Optional["SpendObserver"]) -> Any:
    """The service's Generate observer: the metrics', the spend's, or both."""
    if spend is None:
        return observer
    if observer is None:
        return spend
    return _BothObservers(observer, spend)


def _ts(t: Optional[float]) -> Any:
    from google.protobuf import timestamp_pb2

    if t is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(datetime.fromtimestamp(t, timezone.utc))
    return ts


class SpendObserver:
    """``Spend`` as the service calls it, for the current call's key."""

    def __init__(self, spend: Spend) -> None:
        self.spend = spend

    def caller(self) -> Optional[NamedKey]:
        name = call_context.key()
        return self.spend.keyring.by_name(name) if name else None

    def admit(self, model: str) -> dict[str, str]:
        return self.spend.admit(self.caller(), model)

    def start(self, req: GenerateRequest) -> SpendTracker:
        return SpendTracker(self.spend, self.caller(), call_context.dialect())

    def embedded(self, result: EmbedResult) -> None:
        self.spend.finished(self.caller(), call_context.dialect(), result.backend, result.model,
                            result.prompt_tokens, 0, 0, "stop")

    async def usage(self, request: pb.GetUsageRequest) -> pb.GetUsageResponse:
        """``GetUsage``: an admin key's (or any caller's when no keys are set)."""
        if self.spend.keyring.required:
            key = self.caller()
            if key is None or not key.admin:
                raise PermissionDenied(USAGE_NEEDS_ADMIN)
        group_by = list(request.group_by) or list(GROUPS)
        unknown = [g for g in group_by if g not in GROUPS]
        if unknown:
            raise InvalidArgument(f"group_by: unknown {', '.join(unknown)[:100]}; use key, backend, model")
        since = request.since.ToDatetime(tzinfo=timezone.utc).timestamp() if request.HasField("since") else None
        until = request.until.ToDatetime(tzinfo=timezone.utc).timestamp() if request.HasField("until") else None
        rows = await self.spend.report(since, until, group_by)
        out = pb.GetUsageResponse(by=[pb.UsageGroup(**r) for r in rows])
        for s in self.spend.scopes():
            scope = out.budget.add(scope=s.scope, spent_usd=round(s.spent, 9), resets_at=_ts(s.resets_at))
            if s.limit is not None:
                scope.limit_usd = s.limit
        return out
