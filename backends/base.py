"""The one interface every backend implements and the router composes.

A backend is an object with a ``name`` ("mlx", "ollama", "cloud:<provider>")
and these coroutines.  ``generate`` is an async generator of typed events
(``Chunk`` ... then exactly one ``Done``); closing the generator (the caller was
cancelled) must stop the work behind it: the MLX engine drops the sequence, an
HTTP adapter closes its upstream request.

Failures are raised as ``backends.errors.BackendError`` subclasses so the
router can tell "try the next backend" (``retryable``) from "tell the caller".

``count_tokens`` counts the prompt tokens of a request's input (its chat
template, tools, system and think applied) without generating; a backend
that cannot count raises ``Unimplemented`` (retryable: the router asks the
next).

Optional attribute ``takes_token_ids`` (False when absent): ``embed`` accepts
``EmbedRequest.input_tokens``.  Token ids are a model's own tokenizer's, so
only a backend that runs the model itself can honour them; the router sends
token-id requests to no other backend.

Optional attribute ``is_engine`` (False when absent): the backend is an mlxgate
engine (the local MLX engine, a remote mlxgate service).  Engines that have
a model are interchangeable for it, so the router orders them by where the
model is loaded and by load rather than by priority
(``backends/routing/placement.py``); they must implement ``list_running`` cheaply.

Optional attribute ``serving`` (True when absent): False while the backend
takes no new requests (a remote service draining or unreachable, from its
health watch); the router then skips it.

Optional attribute ``forwards`` (False when absent): calls go on to another
mlxgate (a remote service); a call that another mlxgate forwarded here is
never sent on to such a backend (one hop only, ``backends.call_context``).

Optional coroutine ``start()``: background work to begin when the process
starts (a remote's health watch); ``Router.start`` calls it.  ``close``
ends it.
"""

from __future__ import annotations

from typing import AsyncIterator, Optional, Protocol, runtime_checkable

from backends.types import (
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


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        """Stream the answer; ``req.model`` is the name at this backend."""
        ...

    async def embed(self, req: EmbedRequest) -> EmbedResult: ...

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        """Prompt tokens of ``req``'s input; ``req.model`` is the name at this backend."""
        ...

    async def list_models(self) -> list[ModelInfo]:
        """Models this backend can serve now (names at this backend)."""
        ...

    async def show_model(self, name: str) -> ModelShow: ...

    async def list_running(self) -> list[RunningModel]: ...

    async def load_model(self, name: str, keep_alive: Optional[float]) -> LoadResult: ...

    async def unload_model(self, name: str) -> bool:
        """True when the model was loaded and is now gone."""
        ...

    async def close(self) -> None:
        """Release threads, sessions and models."""
        ...


# The optional attributes above, read with their defaults.

def takes_token_ids(backend: Backend) -> bool:
    return getattr(backend, "takes_token_ids", False)


def is_engine(backend: Backend) -> bool:
    return getattr(backend, "is_engine", False)


def is_serving(backend: Backend) -> bool:
    return getattr(backend, "serving", True)


def forwards_calls(backend: Backend) -> bool:
    return getattr(backend, "forwards", False)
