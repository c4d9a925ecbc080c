"""What a generate request becomes before the engine runs it: its prompt
tokens fitted to the context (``context.fit``), the room left for the
answer, the grammar of its output format or forced tool call, and how its
output is read (stop strings, tool calls, thinking).  Worker-thread work:
the tokenizer, never MLX.  ``observer`` is the engine's (the service's
metrics): it hears what truncation dropped and how long images took.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from backends.errors import InvalidArgument
from backends.mlx import constrain, prompt as prompt_mod
from backends.mlx.context import Fitted, TokenCounter, fit as fit_context
from backends.mlx.model_manager import LoadedModel
from backends.mlx.output import SequenceOutput
from backends.mlx.thinking import new_splitter as new_think_splitter
from backends.mlx.toolcalls import ToolCallSplitter
from backends.mlx.vision import prompt as vision_prompt
from backends.mlx.vision.prompt import VisionIds
from backends.types import GenerateRequest

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a request becomes once tokenized: decided off the event loop."""

    prompt_ids: list[int]
    max_tokens: int
    num_ctx: int
    output: Optional[SequenceOutput] = None
    matcher: object = None
    #: The grammar ``matcher`` was compiled from (a distributed engine's other ranks compile it too).
    grammar: Optional[str] = None
    #: A prompt with images (``vision.prompt.VisionIds``), None otherwise.
    vision: Optional[VisionIds] = None


def plan(req: GenerateRequest, lm: LoadedModel, default_max_tokens: int, observer: Any = None) -> Plan:
    """Tokenize and check the request (worker thread: tokenizer work, no MLX).

    Context rule (``context.fit``): a prompt that does not fit is an error,
    or, with ``req.truncate`` (Ollama's default), loses its oldest messages
    or the start of its text; either way no more of it is tokenized than
    can fit.  max_tokens (explicit or default) is clamped to the room left,
    and the answer then ends with "length" at the context limit, as Ollama
    and mlx-lm do with a generous num_predict; a negative one (no limit)
    is that room.
    """
    ctx = lm.context_length
    if req.sampling.num_ctx:
        ctx = min(ctx, req.sampling.num_ctx)
    if lm.counter is None:
        lm.counter = TokenCounter(lm.tokenizer)
    asked_max = req.sampling.max_tokens
    # Room kept for the answer when history must be dropped anyway.
    reserve = min(asked_max, ctx // 2) if asked_max and asked_max > 0 else ctx // 8
    ids, fitted = fit_context(req, lm.counter, ctx, renderer(lm), reserve)
    if fitted.request is not req:
        _report_truncation(observer, req, lm.name, ctx, fitted)
        req = fitted.request
    n = len(ids)
    room = ctx - n
    asked = default_max_tokens if req.sampling.max_tokens is None else req.sampling.max_tokens
    # A negative limit -- asked for (Ollama's num_predict -1 or -2) or the
    # default (default_max_tokens, -1 unless configured) -- fills the context.
    max_tokens = room if asked < 0 else min(asked, room)
    tok = lm.tokenizer
    matcher = None
    grammar = output_grammar(req, lm)
    what = "tool_choice" if req.tool_choice.forced else "format"
    if grammar is not None:
        lltok = lm.lltok.get(lm.tokenizer._tokenizer, lm.vocab_size, sorted(lm.eos_token_ids))
        matcher = constrain.new_matcher(lltok, grammar, what)
    splitter = None
    if req.tools and tok.has_tool_calling:
        splitter = ToolCallSplitter(
            tok.tool_call_start,
            tok.tool_call_end,
            tok.tool_parser,
            [t.to_template_dict() for t in req.tools],
            forced=req.tool_choice.forced,
        )
    thinking = new_think_splitter(tok, ids, req.think)
    output = SequenceOutput(tok.detokenizer, lm.eos_token_ids, list(req.sampling.stop), splitter, thinking)
    vision = ids if isinstance(ids, VisionIds) else None
    if vision is not None:
        _report_images(observer, lm.name, vision)
    return Plan(list(ids), max_tokens, ctx, output, matcher, grammar, vision)


def count(req: GenerateRequest, lm: LoadedModel) -> int:
    """Prompt tokens of ``req`` as ``plan`` would build them (worker thread).

    The same bounded fitting as a generation, never truncating: an input
    beyond the context is refused ("context length exceeded") without
    tokenizing more of it than the context can hold."""
    ctx = lm.context_length
    if req.sampling.num_ctx:
        ctx = min(ctx, req.sampling.num_ctx)
    if lm.counter is None:
        lm.counter = TokenCounter(lm.tokenizer)
    ids, _ = fit_context(dataclasses.replace(req, truncate=False), lm.counter, ctx, renderer(lm))
    return len(ids)


def output_grammar(req: GenerateRequest, lm: LoadedModel) -> Optional[str]:
    """The request's grammar: its output format's, or a forced tool call's.

    tool_choice "required" / a named function forces exactly one call with
    a grammar written for the model's tool-call syntax; where we have no
    grammar for that syntax the request is refused (INVALID_ARGUMENT), never
    silently left unforced.
    """
    choice = req.tool_choice
    if not choice.forced:
        return constrain.grammar_for(req.format)
    choice.check(req.tools)
    if req.format.kind != "text":
        raise InvalidArgument(
            f"tool_choice {choice.describe()} cannot be combined with a JSON format (response_format)"
        )
    tok = lm.tokenizer
    parser = constrain.tool_parser_name(tok) if tok.has_tool_calling else None
    if parser not in constrain.TOOL_CALL_GRAMMARS:
        fmt = f"tool-call format ({parser})" if parser else "tool-call format (none known)"
        raise InvalidArgument(
            f"tool_choice {choice.describe()} is not supported for this model's {fmt}: {lm.name} "
            f"can only be offered tools (tool_choice auto)"
        )
    tools = [t for t in req.tools if choice.mode != "function" or t.name == choice.function_name]
    return constrain.tool_call_grammar(
        tools, tok.tool_call_start, tok.tool_call_end, tok.tool_call_start_tokens, tok.tool_call_end_tokens
    )


def renderer(lm: LoadedModel) -> Callable[[GenerateRequest], list[int]]:
    """Request -> prompt ids for ``lm``: a VLM builds a request with images
    with its processor (``vision/prompt.py``), everything else is text."""

    def render(r: GenerateRequest) -> list[int]:
        if lm.vision is not None and vision_prompt.has_images(r):
            if not lm.vision.takes_images:
                raise InvalidArgument(
                    f"model {lm.name}: images on the {lm.vision.model_type} architecture (multimodal rotary "
                    "positions) are not served yet; text requests are"
                )
            return vision_prompt.build(r, lm.vision, lm.name)
        return prompt_mod.build_prompt(r, lm.tokenizer, lm.name)

    return render


def _report_truncation(observer: Any, req: GenerateRequest, model: str, ctx: int, fitted: Fitted) -> None:
    """Say what truncation dropped (Ollama logs "truncating input prompt") and count it."""
    if fitted.dropped_messages:
        what = f"{fitted.dropped_messages} of {len(req.messages or [])} messages"
    else:
        what = "the start of the prompt"
    log.info(
        "truncating input prompt: dropped %s (about %d tokens) to fit %s's context of %d tokens (request %s)",
        what, fitted.dropped_tokens, model, ctx, req.request_id,
    )
    if observer is not None and hasattr(observer, "observe_truncation"):
        try:
            observer.observe_truncation(model, fitted.dropped_messages, fitted.dropped_tokens)
        except Exception:  # noqa: BLE001 - metrics never break a request
            log.exception("truncation observer failed")


def _report_images(observer: Any, model: str, ids: VisionIds) -> None:
    if observer is not None and hasattr(observer, "observe_images"):
        try:
            observer.observe_images(model, ids.images, ids.seconds)
        except Exception:  # noqa: BLE001 - metrics never break a request
            log.exception("images observer failed")
