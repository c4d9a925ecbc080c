"""Pieces both dialects share: parsing a body with its dialect model, reading
proto events, times.

The front speaks proto directly: translators build ``mlxgate.v1`` request
messages from the dialect models and render answers from the ``pb.Chunk`` /
``pb.Done`` events the service streams, read in place.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Optional, TypeVar

from google.protobuf import duration_pb2
from pydantic import BaseModel, ValidationError

from gateway.errors import ApiError, bad_request
from mlxgate import jsonutil, limits
from mlxgate.dialects.base import FETCH_IMAGE_URLS_ENV, Tool, log_unknown, wire_error
from mlxgate.names import same_model
from mlxgate.v1 import inference_pb2 as pb

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def parse(model: type[M], data: dict[str, Any], route: str) -> M:
    """A request body (already bounded JSON: ``fields.read_json``) as its
    dialect model; a 400 naming the first bad field otherwise.  Unknown fields
    are kept and logged once per name."""
    try:
        parsed = model.model_validate(data)
    except ValidationError as e:
        err = wire_error(e, data)
        raise bad_request(err.message, param=err.path or None) from None
    log_unknown(parsed, route)
    return parsed


_INTEGER = re.compile(r"^-?[0-9]{1,20}$")


def read_query(request: Any, model: type[M], route: str, integers: tuple[str, ...] = ("limit",)) -> M:
    """A query string as its dialect model: only the model's own parameters
    are read (others are ignored, as the APIs ignore them), ``integers`` as
    integers when they are one; a 400 naming the bad parameter otherwise."""
    data: dict[str, Any] = {}
    for name in model.model_fields:
        value = request.query.get(name)
        if value is not None:
            data[name] = int(value) if name in integers and _INTEGER.match(value) else value
    return parse(model, data, route)


def find_model(models: Iterable[pb.ModelInfo], name: str) -> Optional[pb.ModelInfo]:
    """The listed model called ``name``: that exact name first, else one it
    names Ollama-style (``x:latest`` finds ``x``)."""
    models = list(models)
    return next((m for m in models if m.name == name), None) or next(
        (m for m in models if same_model(m.name, name)), None)


def choose_tools(
    tools: list[T], name_of: Callable[[T], str], mode: str, name: str = "", *,
    required: str = "required", name_param: str = "tool_choice",
) -> tuple[list[T], Optional[pb.ToolChoice]]:
    """The tools a request offers and the call it forces, one rule for every
    dialect: "auto" offers them all unforced, "none" offers none, "required"
    (the dialect calls it ``required``) forces a call to one of them, and
    "function" keeps only the tool called ``name`` and forces a call to it;
    a 400 when there is nothing to force (``name_param``: the field that
    names the tool)."""
    if mode == "none":
        return [], None
    if mode == "auto":
        return tools, None
    if mode == "required":
        if not tools:
            raise bad_request(f'tool_choice "{required}" needs tools', param="tool_choice")
        return tools, pb.ToolChoice(mode=pb.TOOL_CHOICE_REQUIRED)
    chosen = [t for t in tools if name_of(t) == name]
    if not chosen:
        raise bad_request(f"tool_choice names {limits.clip_name(name)!r}, which is not in tools", param=name_param)
    return chosen, pb.ToolChoice(mode=pb.TOOL_CHOICE_FUNCTION, function_name=name)


def text_format(fmt: pb.OutputFormat, forced: Optional[pb.ToolChoice]) -> pb.OutputFormat:
    """The format a request's text follows: none when a call is ``forced``.
    A forced answer is a call, never text, so a text format (response_format,
    Responses' text.format, Anthropic's output_config.format) does not apply
    to it, and the contract forces a call only with free text (the call has
    its own grammar).  Clients send both: the Agents SDK's structured output
    with tool_choice "required"; OpenAI's and Anthropic's APIs accept that."""
    return pb.OutputFormat() if forced is not None else fmt


def rfc3339(dt: Optional[datetime] = None) -> str:
    """UTC, fractional seconds, 'Z' (the shape Ollama's created_at has)."""
    dt = (dt or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def time_of(msg: Any, name: str) -> str:
    """A proto Timestamp field as RFC 3339 (now when unset)."""
    if msg.HasField(name):
        return rfc3339(getattr(msg, name).ToDatetime(tzinfo=timezone.utc))
    return rfc3339()


def duration(seconds: Optional[float]) -> Optional[duration_pb2.Duration]:
    """Seconds (already normalised by the dialect: -1 = keep loaded) as a proto Duration."""
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def tools_pb(tools: Optional[Iterable[Tool]]) -> list[pb.Tool]:
    """``[{"type": "function", "function": {...}}]``, the same in both dialects."""
    return [
        pb.Tool(
            name=t.function.name,
            description=t.function.description or "",
            parameters_json=jsonutil.dumps(t.function.parameters or {}),
        )
        for t in tools or ()
    ]


# ---------------------------------------------------------------- events

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


async def first_event(stream: Any) -> pb.GenerateResponse:
    """A generation's first event (``GenerateStream.start``); a failure
    before any token, reported as a Done, is a plain HTTP error."""
    first = await stream.start()
    if is_done(first):
        check_done(first.done)
    return first


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


#: Why an http(s) image URL is refused, and what turns fetching on.
NOT_FETCHED = (
    f"image URLs are not fetched (turn fetching on with {FETCH_IMAGE_URLS_ENV}=1); "
    "send the image as a data: URL (base64)"
)


def image_bytes(url: str, name: str, bare_base64: bool = False) -> bytes:
    """An image's bytes from a base64 ``data:`` URL (or, with ``bare_base64``,
    from bare base64: the Responses API sends either); other URLs are not
    fetched.  A 400 naming ``name`` otherwise."""
    if not url.startswith("data:"):
        if bare_base64 and "://" not in url and url:
            try:
                return base64.b64decode(url, validate=True)
            except (binascii.Error, ValueError):
                raise bad_request(f"{name}: invalid base64 image; send data: URLs (base64) or base64",
                                  param=name) from None
        if url.lower().startswith(("http://", "https://")):
            raise bad_request(f"{name}: {NOT_FETCHED}", param=name)
        accepted = "data: URLs (base64) or base64" if bare_base64 else "data: URLs (base64)"
        raise bad_request(f"{name}: only {accepted} are supported for images", param=name)
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise bad_request(f"{name}: the data: URL must be base64-encoded", param=name)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{name}: invalid base64 in data: URL", param=name) from None
