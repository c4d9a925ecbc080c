"""Reading the service's generation events (``pb.GenerateResponse``: a
``pb.Chunk`` or the final ``pb.Done``) in place, as every dialect renders them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from gateway.errors import ApiError
from mlxgate.v1 import inference_pb2 as pb

_FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_ERROR: "error",
}


def finish_of(done: pb.Done) -> str:
    """The contract's finish reason as the dialects' tables key it ("stop", "length", ...)."""
    return _FINISH.get(done.finish_reason, "stop")


def check_done(done: pb.Done) -> None:
    """A Done that reports a failure becomes an error answer."""
    if done.finish_reason == pb.FINISH_REASON_ERROR:
        raise ApiError(500, done.error_message or "generation failed")


def is_done(ev: pb.GenerateResponse) -> bool:
    return ev.WhichOneof("event") == "done"


@dataclass
class Collected:
    """A whole generation, gathered for a non-streaming answer."""

    text: str = ""
    tool_calls: list[pb.ToolCall] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    done: pb.Done = field(default_factory=pb.Done)
    thinking: str = ""


def collect(events: Iterable[pb.GenerateResponse]) -> Collected:
    out = Collected()
    parts: list[str] = []
    thoughts: list[str] = []
    for ev in events:
        if is_done(ev):
            out.done = ev.done
        else:
            ch = ev.chunk
            parts.append(ch.text)
            thoughts.append(ch.thinking)
            out.tool_calls.extend(ch.tool_calls)
            out.logprobs.extend(ch.logprobs)
    out.text = "".join(parts)
    out.thinking = "".join(thoughts)
    return out

