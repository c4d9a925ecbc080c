"""Fitting a request into a model's context at a bounded cost.

A prompt is tokenized only as far as it can matter: ``TokenCounter.count``
tokenizes text in pieces and stops as soon as the count passes what the
context can hold, and a text whose length alone proves it too long is not
tokenized at all (no token covers more characters than the longest entry of
the vocabulary).  So a 25 MB prompt costs a few milliseconds to refuse, not
a full tokenization, and the work for any request is bounded by the context
length, not by what the caller sent.

``fit`` then applies the request's overflow rule:

* ``truncate`` false (OpenAI, gRPC default): a prompt that does not fit is
  ``InvalidArgument("context length exceeded ...")``.
* ``truncate`` true (Ollama's default): a chat keeps its system messages and
  the newest messages that fit, the last message always (Ollama's
  ``chatPrompt``); a prompt keeps its end.  When even that does not fit,
  the request is refused as above.

Tokenizer work only (no MLX): runs in a worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional

from backends.errors import InvalidArgument
from backends.types import GenerateRequest, Message
from mlxgate.jsonutil import dumps

log = logging.getLogger(__name__)

#: Characters tokenized at a time when counting (a few thousand tokens).
PIECE_CHARS = 8192
#: Pieces handed to the tokenizer in one batch (it parallelises a batch).
PIECES_PER_BATCH = 8
#: Tokens a message costs beyond its text (role headers, separators): an
#: estimate used only to choose which messages to keep; the rendered prompt
#: is always tokenized exactly before it is used.
MESSAGE_OVERHEAD_TOKENS = 8


@dataclass(frozen=True)
class Count:
    """Tokens in a text, counted at most up to a cap.

    ``estimate`` is the count of the pieces tokenized (exact for a text of one
    piece; pieces tokenized apart can gain a token at each cut).  ``lower`` is
    a certain lower bound.  When ``lower`` reaches the cap, counting stopped
    early and the true count is at least ``lower``.
    """

    estimate: int
    lower: int


def _pieces(text: str, size: int = PIECE_CHARS) -> list[tuple[int, int]]:
    """(start, end) spans of about ``size`` characters, cut before whitespace when possible."""
    spans = []
    start, n = 0, len(text)
    while start < n:
        end = min(n, start + size)
        if end < n:
            cut = text.rfind(" ", start + size // 2, end)
            if cut < 0:
                cut = text.rfind("\n", start + size // 2, end)
            if cut > start:
                end = cut
        spans.append((start, end))
        start = end
    return spans


class TokenCounter:
    """Bounded token counting for one tokenizer (one per loaded model)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        rust = getattr(hf, "_tokenizer", None)
        self._batch: Optional[Callable[[list[str]], list[int]]] = None
        if rust is not None and hasattr(rust, "encode_batch"):
            self._batch = lambda texts: [len(e.ids) for e in rust.encode_batch(texts, add_special_tokens=False)]
        vocab = tokenizer.get_vocab()
        #: No token stands for more characters of text than its vocabulary entry has.
        self.max_token_chars = max((len(t) for t in vocab), default=1) or 1

    def _lengths(self, texts: list[str]) -> list[int]:
        if self._batch is not None:
            return self._batch(texts)
        return [len(self._tokenizer.encode(t, add_special_tokens=False)) for t in texts]

    def count(self, text: str, cap: int) -> Count:
        """Tokens in ``text``, tokenizing no more than needed to pass ``cap``."""
        if not text:
            return Count(0, 0)
        floor = len(text) // self.max_token_chars
        if floor >= cap:
            return Count(floor, floor)
        spans = _pieces(text)
        total = 0
        for b in range(0, len(spans), PIECES_PER_BATCH):
            batch = spans[b : b + PIECES_PER_BATCH]
            total += sum(self._lengths([text[s:e] for s, e in batch]))
            done = b + len(batch)
            lower = max(floor, total - (done - 1))
            if lower >= cap and done < len(spans):
                return Count(total, lower)
        return Count(total, max(floor, total - (len(spans) - 1)))

    def head(self, text: str, tokens: int) -> str:
        """A start of ``text`` holding at least ``tokens`` tokens (or all of it), tokenizing no further."""
        spans = _pieces(text)
        total = 0
        for b in range(0, len(spans), PIECES_PER_BATCH):
            batch = spans[b : b + PIECES_PER_BATCH]
            for (s, e), n in zip(batch, self._lengths([text[s:e] for s, e in batch])):
                total += n
                if total > tokens + 1:
                    return text[:e]
        return text

    def tail(self, text: str, tokens: int) -> str:
        """The end of ``text`` holding about ``tokens`` tokens (tokenizing from the end, bounded)."""
        if tokens <= 0:
            return ""
        spans = _pieces(text)
        kept = 0
        for i in range(len(spans) - 1, -1, -1):
            s, e = spans[i]
            n = self._lengths([text[s:e]])[0]
            if kept + n <= tokens:
                kept += n
                continue
            ids = self._tokenizer.encode(text[s:e], add_special_tokens=False)
            want = tokens - kept
            return (self._tokenizer.decode(ids[-want:]) if want > 0 else "") + text[e:]
        return text


def _message_text(m: Message) -> str:
    parts = [m.content, m.thinking]
    for c in m.tool_calls:
        parts.append(c.name)
        parts.append(dumps(c.arguments))
    return "".join(parts)


def context_error(n: int, ctx: int, exact: bool = True) -> InvalidArgument:
    what = f"{n} tokens" if exact else f"at least {n} tokens"
    return InvalidArgument(f"context length exceeded: the prompt has {what}, the context length is {ctx}")


@dataclass
class Fitted:
    """A request reduced to what fits, and what was dropped to get there."""

    request: GenerateRequest
    dropped_messages: int = 0
    dropped_tokens: int = 0


def fit(
    req: GenerateRequest,
    counter: TokenCounter,
    ctx: int,
    render: Callable[[GenerateRequest], list[int]],
    reserve: int = 0,
) -> tuple[list[int], Fitted]:
    """Prompt ids for ``req`` within ``ctx`` tokens, by ``req.truncate``'s rule.

    ``render`` turns a request into prompt ids (chat template, tokenizer).
    ``reserve``: tokens to leave for the answer when something must be dropped
    anyway (truncation aims below ``ctx - reserve``; a prompt that fits as it
    is is never cut).
    """
    if req.prompt is not None:
        return _fit_prompt(req, counter, ctx, render, reserve)
    return _fit_chat(req, counter, ctx, render, reserve)


def _fit_prompt(req, counter, ctx, render, reserve) -> tuple[list[int], Fitted]:
    p = req.prompt
    fixed = counter.count(p.system + p.suffix, ctx)
    if fixed.lower >= ctx:
        raise context_error(fixed.lower, ctx, exact=False)
    body = counter.count(p.prompt, ctx)
    if fixed.lower + body.lower >= ctx and not (req.truncate and not p.suffix):
        raise context_error(fixed.lower + body.lower, ctx, exact=False)
    if fixed.lower + body.lower < ctx:
        ids = render(req)
        if len(ids) < ctx:
            return ids, Fitted(req)
        if not req.truncate or p.suffix:
            raise context_error(len(ids), ctx)
    # Keep the end of the prompt: the part a continuation depends on.
    overhead = len(render(dataclasses.replace(req, prompt=dataclasses.replace(p, prompt=""))))
    budget = max(1, ctx - reserve) - overhead
    for _ in range(4):
        if budget <= 0:
            break
        kept = counter.tail(p.prompt, budget)
        cut = dataclasses.replace(req, prompt=dataclasses.replace(p, prompt=kept))
        ids = render(cut)
        if len(ids) < ctx:
            dropped = max(0, body.estimate - counter.count(kept, ctx).estimate)
            return ids, Fitted(cut, dropped_tokens=dropped)
        budget -= len(ids) - ctx + 1 + budget // 8
    raise InvalidArgument(f"context length exceeded: the prompt does not fit the context length of {ctx} tokens")


def _fit_chat(req, counter, ctx, render, reserve) -> tuple[list[int], Fitted]:
    msgs = req.messages or []
    if not msgs:
        return render(req), Fitted(req)
    last = len(msgs) - 1
    est = [ctx] * len(msgs)
    low = [ctx] * len(msgs)

    def measure(i: int) -> None:
        c = counter.count(_message_text(msgs[i]), ctx)
        est[i], low[i] = c.estimate + MESSAGE_OVERHEAD_TOKENS, c.lower

    # What is always kept: tools, system messages, the last message.  When that
    # alone cannot fit, refuse before rendering anything.
    fixed_low = counter.count(dumps([t.to_template_dict() for t in req.tools]), ctx).lower if req.tools else 0
    system_idx = [i for i, m in enumerate(msgs) if m.role == "system" and i != last]
    for i in [last, *system_idx]:
        measure(i)
        fixed_low += low[i]
        if fixed_low >= ctx:
            raise context_error(fixed_low, ctx, exact=False)
    # Then the rest, newest first: once they fill the context, older ones are
    # never tokenized (with truncation they are dropped; without, the request
    # is already known to be too long).
    total_low = fixed_low
    for i in range(last - 1, -1, -1):
        if msgs[i].role == "system":
            continue
        measure(i)
        total_low += low[i]
        if total_low >= ctx:
            if not req.truncate:
                raise context_error(total_low, ctx, exact=False)
            break
    if total_low < ctx:
        ids = render(req)
        if len(ids) < ctx:
            return ids, Fitted(req)
        if not req.truncate:
            raise context_error(len(ids), ctx)
    # Ollama's rule: system messages stay; keep the newest messages that fit.
    target = max(1, ctx - reserve)
    used = sum(est[i] for i in system_idx) + est[last]
    start = last
    while start > 0:
        i = start - 1
        extra = 0 if msgs[i].role == "system" else est[i]
        if used + extra > target:
            break
        used += extra
        start = i
    for _ in range(8):
        kept = [m for j, m in enumerate(msgs) if j >= start or m.role == "system"]
        cut = dataclasses.replace(req, messages=kept)
        ids = render(cut)
        if len(ids) < ctx:
            dropped = len(msgs) - len(kept)
            dropped_tokens = sum(est[j] for j in range(start) if msgs[j].role != "system")
            return ids, Fitted(cut, dropped_messages=dropped, dropped_tokens=dropped_tokens)
        if start >= last:
            break
        # Still too long: drop the oldest kept non-system messages until the
        # estimates cover the overflow, then render again.
        over = len(ids) - target
        while start < last and over > 0:
            if msgs[start].role != "system":
                over -= est[start]
            start += 1
    raise InvalidArgument(
        "context length exceeded: the last message with the system messages and tools does not fit "
        f"the context length of {ctx} tokens"
    )
