"""Tools and tool choice, one rule for every dialect: which tools a request
offers, which call it forces, and the text format that leaves."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, TypeVar

from gateway.errors import bad_request
from mlxgate import jsonutil, limits
from mlxgate.dialects.base import Tool
from mlxgate.v1 import inference_pb2 as pb

T = TypeVar("T")


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


def tools_pb(tools: Optional[Iterable[Tool]]) -> list[pb.Tool]:
    """``[{"type": "function", "function": {...}}]``, the same in the Ollama and OpenAI dialects."""
    return [
        pb.Tool(
            name=t.function.name,
            description=t.function.description or "",
            parameters_json=jsonutil.dumps(t.function.parameters or {}),
        )
        for t in tools or ()
    ]
