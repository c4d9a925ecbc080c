"""An in-process Backend whose behaviour a test scripts: what it lists, what it
answers, and which BackendError it raises (before or after its first chunk).

Stands in for the MLX engine in router tests, where what matters is the
router's reaction to "the engine is unavailable" rather than MLX itself.
With ``is_engine=True`` it is one of the engines the router places (the local
engine, a remote service); ``serving`` stands for a remote's health; ``hold``
keeps each stream open after its first chunk until the event is set.

``ByModelNameBackend`` is the same fake for the error tests, where one
server must answer, fail and stall on demand: the request's model name
picks what happens (``BEFORE_FIRST_CHUNK`` and its ``generate``).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

from backends.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
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


class ScriptedBackend:
    def __init__(
        self,
        name: str,
        models: list[str],
        *,
        text: Optional[list[str]] = None,
        fail: Optional[BackendError] = None,
        fail_after: Optional[int] = None,
        list_error: Optional[BaseException] = None,
        report_model: str = "",
        list_delay: float = 0.0,
        is_engine: bool = False,
        serving: bool = True,
        hold: Optional[asyncio.Event] = None,
    ) -> None:
        self.name = name
        self.models = list(models)
        self.text = ["from ", name] if text is None else list(text)
        #: raised by generate/embed/show/load: before the first chunk, or after
        #: ``fail_after`` chunks when that is set
        self.fail = fail
        self.fail_after = fail_after
        self.list_error = list_error
        #: the model name put in Done (empty: leave it to the router)
        self.report_model = report_model
        self.list_delay = list_delay
        self.calls: list[tuple[str, str]] = []
        self.list_calls = 0
        self.streams_closed = 0
        self.loaded: set[str] = set()
        self.is_engine = is_engine
        self.serving = serving
        self.hold = hold
        self.running_calls = 0

    def _check(self, name: str) -> None:
        if name not in self.models:
            raise ModelNotFound(f"{self.name}: model '{name}' not found")

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        self.calls.append(("generate", req.model))
        try:
            if self.fail is not None and self.fail_after is None:
                raise self.fail
            self._check(req.model)
            for i, piece in enumerate(self.text):
                if self.fail is not None and self.fail_after == i:
                    raise self.fail
                yield Chunk(text=piece)
                if i == 0 and self.hold is not None:
                    await self.hold.wait()
                await asyncio.sleep(0)
            yield Done(prompt_tokens=3, completion_tokens=len(self.text), model=self.report_model)
        finally:
            self.streams_closed += 1

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        self.calls.append(("embed", req.model))
        if self.fail is not None:
            raise self.fail
        self._check(req.model)
        return EmbedResult(embeddings=[[1.0, 0.0] for _ in req.inputs], model=req.model)

    async def list_models(self) -> list[ModelInfo]:
        self.list_calls += 1
        if self.list_delay:
            await asyncio.sleep(self.list_delay)
        if self.list_error is not None:
            raise self.list_error
        return [ModelInfo(name=m, backend=self.name, size_bytes=len(m)) for m in self.models]

    async def show_model(self, name: str) -> ModelShow:
        self.calls.append(("show", name))
        if self.fail is not None:
            raise self.fail
        self._check(name)
        return ModelShow(info=ModelInfo(name=name, backend=self.name), context_length=128)

    async def list_running(self) -> list[RunningModel]:
        self.running_calls += 1
        if self.list_error is not None:
            raise self.list_error
        return [RunningModel(name=m, backend="") for m in sorted(self.loaded)]

    async def load_model(self, name: str, keep_alive: Optional[float]) -> LoadResult:
        self.calls.append(("load", name))
        if self.fail is not None:
            raise self.fail
        self._check(name)
        self.loaded.add(name)
        return LoadResult(model=name, backend=self.name)

    async def unload_model(self, name: str) -> bool:
        self.calls.append(("unload", name))
        was = name in self.loaded
        self.loaded.discard(name)
        return was

    async def close(self) -> None:
        pass


#: What ``ByModelNameBackend`` raises before any chunk, by model name ("busy" is built with its retry hint).
BEFORE_FIRST_CHUNK: dict[str, BackendError] = {
    "down": Unavailable("backend is down"),
    "slow": DeadlineExceeded("took too long"),
    "auth": Unauthenticated("bad upstream key"),
    "denied": PermissionDenied("not allowed"),
    "unimpl": Unimplemented("no suffix support"),
    "bad": InvalidArgument("no good"),
}


class ByModelNameBackend(ScriptedBackend):
    """Answers, fails or stalls according to the model name.

    A name in ``BEFORE_FIRST_CHUNK`` (or "busy": ResourceExhausted with
    ``retry_after``) raises before the first chunk; "crash" raises an
    internal error whose text must not reach the client; "fails-first" ends
    with an error Done before any chunk; after the chunk "hello ", "dies"
    raises Unavailable and "done-error" ends with an error Done; "pauses"
    waits 0.3 s before the last chunk, "world" (with ``thinking`` beside it
    when set); "stops" names the stop sequence "STOP".  Any other name
    answers "hello world".  Embeddings are refused as busy, show as
    unimplemented, loads as unavailable, and no backend-side count exists.
    """

    def __init__(self, *, retry_after: float, thinking: str = "") -> None:
        super().__init__("scripted", ["ok", "dies", "pauses", "stops"])
        self.retry_after = retry_after
        self.thinking = thinking

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        if req.model == "busy":
            raise ResourceExhausted("queue is full", retry_after=self.retry_after)
        if req.model in BEFORE_FIRST_CHUNK:
            raise BEFORE_FIRST_CHUNK[req.model]
        if req.model == "crash":
            raise RuntimeError("secret internals /home/x/.key")
        if req.model == "fails-first":
            yield Done(finish_reason="error", error_message="could not start", backend=self.name)
            return
        yield Chunk(text="hello ")
        if req.model == "dies":
            raise Unavailable("backend went away mid-stream")
        if req.model == "done-error":
            yield Done(finish_reason="error", error_message="engine failed mid-way", backend=self.name)
            return
        if req.model == "pauses":
            await asyncio.sleep(0.3)
        yield Chunk(thinking=self.thinking, text="world")
        yield Done(finish_reason="stop", prompt_tokens=9, completion_tokens=2, cached_prompt_tokens=4,
                   backend=self.name, model=req.model, stop_sequence="STOP" if req.model == "stops" else "")

    async def count_tokens(self, req: GenerateRequest) -> TokenCount:
        raise Unimplemented("scripted: cannot count")

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        raise ResourceExhausted("embed queue full")

    async def show_model(self, name: str) -> ModelShow:
        raise Unimplemented("no")

    async def load_model(self, name: str, keep_alive: Optional[float]) -> LoadResult:
        raise Unavailable("cannot load")
