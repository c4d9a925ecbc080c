"""OpenAI REST <-> proto.  Requests in, responses out; no I/O here.

The wire format is declared once, in ``mlxgate/dialects/openai.py`` (request
models, response shapes, roles, finish reasons); this module maps it onto the
contract: a parsed request becomes ``pb.GenerateRequest``s (one per prompt
and choice) or a ``pb.EmbedRequest``, and ``pb.Chunk`` / ``pb.Done`` events
become the dialect's response dicts.  The contract's limits are checked by
the inference service; what is checked here is OpenAI's own rules (ranges,
``n``, ``tool_choice`` against ``tools``, data: URLs...).

Deliberate choices (gateway/README.md lists them all): embeddings ``input``
may be token ids — the model's own tokenizer's, taken for models this server
runs (MLX) and refused (400) for a model only an upstream serves; token-array
*prompts* on /v1/completions are 400.  A tool call an upstream cut short comes
with finish reason "length", never "tool_calls", so a client never runs a call
whose arguments were truncated.
"""

from __future__ import annotations

import base64
import os
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from gateway.errors import bad_request
from gateway.events import Collected, check_done, finish_of
from gateway.images import image_bytes, image_detail
from gateway.parsing import parse
from gateway.tools import choose_tools, text_format, tools_pb
from mlxgate import jsonutil, limits
from mlxgate.dialects import openai as wire
from mlxgate.dialects.base import Tool, produced_arguments
from mlxgate.v1 import inference_pb2 as pb

#: Generations one request may start (n, times the prompts of /v1/completions).
MAX_CHOICES = limits.MAX_CHOICES

_ROLE = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def fingerprint(backend: str) -> str:
    return f"fp_mlxgate_{backend.replace(':', '_')}" if backend else "fp_mlxgate"


# ---------------------------------------------------------------- shared request parts


def sampling(r: wire._Sampling, max_tokens: Optional[int]) -> pb.SamplingParams:
    s = pb.SamplingParams(stop=r.stops())
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k", "min_p",
                 "repeat_penalty"):
        v = getattr(r, name)
        if v is not None:
            setattr(s, name, v)
    if max_tokens is not None:
        s.max_tokens = max_tokens
    return s


@dataclass
class Parsed:
    """A parsed chat or completions request; ``requests()`` gives the n gRPC requests."""

    model: str
    base: list[pb.GenerateRequest]  # one per prompt (chat: exactly one)
    n: int
    stream: bool
    include_usage: bool
    seed: Optional[int]
    logprobs: int = -1  # completions: top logprobs asked for; -1 = none

    def requests(self) -> list[pb.GenerateRequest]:
        """prompt-major: choice index = prompt_index * n + i."""
        out = []
        for base in self.base:
            for i in range(self.n):
                r = pb.GenerateRequest()
                r.CopyFrom(base)
                if self.seed is not None and i > 0:
                    r.sampling.seed = (self.seed + i) % 2**63
                out.append(r)
        return out


def _include_usage(r: wire._Sampling) -> bool:
    return bool(r.stream_options is not None and r.stream_options.include_usage)


# ---------------------------------------------------------------- chat


def _content(m: wire.ChatMessage, name: str) -> tuple[str, list[bytes], list[int]]:
    """The text, the images and each image's detail (all "auto": none) of a message."""
    if m.content is None:
        return "", [], []
    if isinstance(m.content, str):
        return m.content, [], []
    texts: list[str] = []
    images: list[bytes] = []
    details: list[int] = []
    for i, part in enumerate(m.content):
        pname = f"{name}[{i}]"
        if isinstance(part, wire.TextPart):
            texts.append(part.text)
        elif isinstance(part, wire.RefusalPart):
            texts.append(part.refusal)
        elif m.role == "user":
            images.append(image_bytes(part.url, f"{pname}.image_url.url"))
            details.append(image_detail(part.image_url.detail if isinstance(part.image_url, wire.ImageURL) else None))
        else:
            raise bad_request(f"{pname}.type {part.type!r} is not supported here", param=f"{pname}.type")
    return "".join(texts), images, details if any(details) else []


def messages_pb(messages: list[wire.ChatMessage]) -> list[pb.ChatMessage]:
    out: list[pb.ChatMessage] = []
    names_by_id: dict[str, str] = {}
    for i, m in enumerate(messages):
        text, images, details = _content(m, f"messages[{i}].content")
        calls = []
        for j, c in enumerate(m.tool_calls or ()):
            call = pb.ToolCall(
                id=c.id or "", name=c.function.name, arguments_json=jsonutil.dumps(c.function.arguments or {}), index=j
            )
            if call.id:
                names_by_id[call.id] = call.name
            calls.append(call)
        legacy = m.legacy_call()
        if legacy is not None and not calls:
            # The deprecated function_call: the same call, answered by a later role "function".
            calls.append(pb.ToolCall(name=legacy.name, arguments_json=jsonutil.dumps(
                produced_arguments(legacy.arguments))))
        tool_call_id = m.tool_call_id or ""
        out.append(
            pb.ChatMessage(
                role=_ROLE[wire.ROLES[m.role]],
                content=text,
                images=images,
                image_details=details,
                tool_calls=calls,
                tool_call_id=tool_call_id,
                tool_name=names_by_id.get(tool_call_id, "") or m.function_result_name(),
                thinking=m.reasoning_content or "",
            )
        )
    return out


def output_format(rf: Optional[wire.ResponseFormat]) -> pb.OutputFormat:
    if rf is None or rf.type == "text":
        return pb.OutputFormat()
    if rf.type == "json_object":
        return pb.OutputFormat(type=pb.FORMAT_TYPE_JSON)
    if rf.json_schema is None:
        raise bad_request("response_format.json_schema is required", param="response_format.json_schema")
    if rf.json_schema.schema_ is None:
        return pb.OutputFormat(type=pb.FORMAT_TYPE_JSON)
    return pb.OutputFormat(type=pb.FORMAT_TYPE_JSON_SCHEMA, json_schema=jsonutil.dumps(rf.json_schema.schema_))


def _tool_choice(r: wire.ChatCompletionRequest) -> tuple[list[Tool], Optional[pb.ToolChoice]]:
    """The tools to send and whether a call is forced (``gateway.tools.choose_tools``)."""
    tc = r.tool_choice
    mode, name = (tc or "auto", "") if tc is None or isinstance(tc, str) else ("function", tc.function.name)
    return choose_tools(list(r.tools or ()), lambda t: t.function.name, mode, name)


def chat_request(data: dict[str, Any]) -> Parsed:
    r = parse(wire.ChatCompletionRequest, data, "/v1/chat/completions")
    messages = messages_pb(r.messages)
    tools, choice = _tool_choice(r)
    fmt = text_format(output_format(r.response_format), choice)
    top = r.top_logprobs or 0
    if top and not r.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
    req = pb.GenerateRequest(
        model=r.model,
        tools=tools_pb(tools),
        sampling=sampling(r, max_tokens),
        format=fmt,
        logprobs=bool(r.logprobs),
        top_logprobs=top,
    )
    if choice is not None:
        req.tool_choice.CopyFrom(choice)
    req.chat.messages.extend(messages)
    if r.reasoning_effort is not None:
        req.think = r.reasoning_effort != "none"
    return Parsed(r.model, [req], r.n or 1, bool(r.stream), _include_usage(r), r.seed)


# ---------------------------------------------------------------- completions


def completion_request(data: dict[str, Any]) -> Parsed:
    r = parse(wire.CompletionRequest, data, "/v1/completions")
    if r.echo:
        raise bad_request("echo is not supported", param="echo")
    n = r.n or 1
    if r.best_of is not None and r.best_of != n:
        raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
    prompts = wire.texts("" if r.prompt is None else r.prompt)
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(
            f"prompt × n asks for {len(prompts) * n} completions; at most {MAX_CHOICES} per request", param="n"
        )
    top = r.logprobs
    base = []
    for p in prompts:
        req = pb.GenerateRequest(
            model=r.model, sampling=sampling(r, r.max_tokens), logprobs=top is not None, top_logprobs=top or 0
        )
        req.prompt.CopyFrom(pb.PromptInput(prompt=p, suffix=r.suffix or "", raw=True))
        base.append(req)
    return Parsed(r.model, base, n, bool(r.stream), _include_usage(r), r.seed, logprobs=-1 if top is None else top)


# ---------------------------------------------------------------- responses


def finish_reason(done: pb.Done, had_tool_calls: bool) -> wire.FinishReason:
    """"tool_calls" when the answer has calls, unless it was cut: a call an
    upstream cut short comes with "length", as OpenAI marks it, so a client
    never runs a call whose arguments were truncated."""
    check_done(done)
    reason = finish_of(done)
    if had_tool_calls and reason != "length":
        return "tool_calls"
    return wire.FINISH_REASON.get(reason, "stop")  # type: ignore[return-value]


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> wire.Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def usage_of(dones: list[pb.Done], n: int) -> wire.Usage:
    """Prompt tokens count once per prompt (every n-th Done), completions all."""
    prompt = sum(d.prompt_tokens for d in dones[::n])
    cached = sum(d.cached_prompt_tokens for d in dones[::n])
    return usage(prompt, sum(d.completion_tokens for d in dones), cached)


def chat_logprobs(lps: Iterable[pb.TokenLogprob]) -> wire.ChoiceLogprobs:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())} for t in lp.top_logprobs
                ],
            }
            for lp in lps
        ],
        "refusal": None,
    }


def completion_logprobs(lps: Iterable[pb.TokenLogprob], offset: int = 0) -> wire.CompletionLogprobs:
    lps = list(lps)
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top_logprobs} for lp in lps],
        "text_offset": offsets,
    }


def tool_calls_json(calls: Iterable[pb.ToolCall]) -> list[wire.ResponseToolCall]:
    # arguments_json is JSON text of an object already (the service wrote it): sent as is.
    return [
        {
            "id": c.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments_json or "{}"},
        }
        for c in calls
    ]


def chat_completion(p: Parsed, results: list[Collected]) -> wire.ChatCompletion:
    choices: list[wire.ChatChoice] = []
    for i, r in enumerate(results):
        msg: wire.AssistantMessage = {"role": "assistant", "content": r.text, "refusal": None}
        if r.thinking:
            msg["reasoning_content"] = r.thinking
        if r.tool_calls:
            msg["tool_calls"] = tool_calls_json(r.tool_calls)
            msg["content"] = r.text or None
        choices.append(
            {
                "index": i,
                "message": msg,
                "finish_reason": finish_reason(r.done, bool(r.tool_calls)),
                "logprobs": chat_logprobs(r.logprobs) if r.logprobs else None,
            }
        )
    return _whole_answer("chatcmpl", "chat.completion", p, choices, results)  # type: ignore[return-value]


def _whole_answer(
    id_prefix: str, obj: str, p: Parsed, choices: list[Any], results: list[Collected]
) -> dict[str, Any]:
    """The envelope chat and text completions share around their choices."""
    return {
        "id": new_id(id_prefix),
        "object": obj,
        "created": int(time.time()),
        "model": p.model,
        "choices": choices,
        "usage": usage_of([r.done for r in results], p.n),
        "system_fingerprint": fingerprint(results[0].done.backend if results else ""),
    }


def completion(p: Parsed, results: list[Collected]) -> wire.Completion:
    choices: list[wire.CompletionChoice] = []
    for i, r in enumerate(results):
        choices.append(
            {
                "index": i,
                "text": r.text,
                "finish_reason": finish_reason(r.done, False),
                "logprobs": completion_logprobs(r.logprobs) if p.logprobs >= 0 else None,
            }
        )
    return _whole_answer("cmpl", "text_completion", p, choices, results)  # type: ignore[return-value]


class ChatStream:
    """Renders (choice index, event) pairs into chat.completion.chunk objects."""

    object = "chat.completion.chunk"

    def __init__(self, p: Parsed) -> None:
        self.p = p
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.started: set[int] = set()
        self.tool_index: dict[int, int] = {}
        self.dones: dict[int, pb.Done] = {}
        self.offsets: dict[int, int] = {}

    def _chunk(self, choices: list[Any]) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.p.model,
            # One fingerprint per stream (n > 1 choices may come from different backends).
            "system_fingerprint": fingerprint(""),
            "choices": choices,
        }
        if self.p.include_usage:
            d["usage"] = None
        return d

    def _choice(self, i: int, delta: wire.Delta, ch: Optional[pb.Chunk], finish: Optional[str]) -> wire.ChunkChoice:
        lps = chat_logprobs(ch.logprobs) if ch is not None and ch.logprobs else None
        return {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}  # type: ignore[typeddict-item]

    def render(self, item: tuple[int, pb.GenerateResponse]) -> list[dict[str, Any]]:
        i, ev = item
        out = []
        if i not in self.started:
            self.started.add(i)
            out.append(self._chunk([self._choice(i, {"role": "assistant", "content": ""}, None, None)]))
        if ev.WhichOneof("event") == "done":
            finish = finish_reason(ev.done, i in self.tool_index)
            self.dones[i] = ev.done
            last = self._chunk([self._choice(i, {}, None, finish)])
            last["backend"] = ev.done.backend
            out.append(last)
            return out
        ch = ev.chunk
        if ch.thinking:
            out.append(self._chunk([self._choice(i, {"reasoning_content": ch.thinking}, None, None)]))
        if ch.tool_calls:
            calls: list[wire.DeltaToolCall] = []
            for c in ch.tool_calls:
                k = self.tool_index.get(i, 0)
                self.tool_index[i] = k + 1
                d: Any = tool_calls_json([c])[0]
                d["index"] = k
                calls.append(d)
            out.append(self._chunk([self._choice(i, {"tool_calls": calls}, None, None)]))
        if ch.text or ch.logprobs:
            out.append(self._chunk([self._choice(i, {"content": ch.text}, ch, None)]))
        return out

    def tail(self) -> list[dict[str, Any]]:
        if not self.p.include_usage:
            return []
        dones = [self.dones[i] for i in sorted(self.dones)]
        d = self._chunk([])
        d["usage"] = usage_of(dones, self.p.n)
        return [d]


class CompletionStream(ChatStream):
    object = "text_completion"

    def __init__(self, p: Parsed) -> None:
        super().__init__(p)
        self.id = new_id("cmpl")

    def render(self, item: tuple[int, pb.GenerateResponse]) -> list[dict[str, Any]]:
        i, ev = item
        if ev.WhichOneof("event") == "done":
            self.dones[i] = ev.done
            choice = {"index": i, "text": "", "logprobs": None, "finish_reason": finish_reason(ev.done, False)}
            last = self._chunk([choice])
            last["backend"] = ev.done.backend
            return [last]
        ch = ev.chunk
        if not (ch.text or ch.logprobs):
            return []
        off = self.offsets.get(i, 0)
        self.offsets[i] = off + len(ch.text)
        lps = completion_logprobs(ch.logprobs, off) if self.p.logprobs >= 0 else None
        return [self._chunk([{"index": i, "text": ch.text, "logprobs": lps, "finish_reason": None}])]


# ---------------------------------------------------------------- embeddings


@dataclass
class ParsedEmbeddings:
    model: str
    req: pb.EmbedRequest
    base64: bool


def embeddings_request(data: dict[str, Any]) -> ParsedEmbeddings:
    r = parse(wire.EmbeddingsRequest, data, "/v1/embeddings")
    texts, token_inputs = wire.embedding_inputs(r.input)
    # OpenAI refuses an input longer than the model's context (400); it never cuts it silently.
    req = pb.EmbedRequest(
        model=r.model,
        input=texts,
        input_tokens=[pb.TokenIds(ids=ids) for ids in token_inputs],
        dimensions=r.dimensions or 0,
        truncate=False,
    )
    return ParsedEmbeddings(r.model, req, r.encoding_format == "base64")


def embeddings_response(p: ParsedEmbeddings, res: pb.EmbedResponse) -> wire.EmbeddingList:
    """The answer; ``dimensions`` beyond the model's size is OpenAI's 400.  The contract
    keeps the whole vector then (Ollama's reading), so the size is known only from it."""
    data: list[wire.Embedding] = []
    for i, e in enumerate(res.embeddings):
        values = list(e.values)
        if p.req.dimensions > len(values):
            raise bad_request(
                f"dimensions ({p.req.dimensions}) exceed {res.model or p.model}'s embedding size {len(values)}",
                param="dimensions",
            )
        emb: Any = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() if p.base64 else values
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": p.model,
        "usage": {"prompt_tokens": res.prompt_tokens, "total_tokens": res.prompt_tokens},
    }


# ---------------------------------------------------------------- models


def model_json(m: pb.ModelInfo) -> wire.Model:
    created = m.modified_at.seconds if m.HasField("modified_at") else 0
    return {"id": m.name, "object": "model", "created": created, "owned_by": m.backend}


def models_response(res: pb.ListModelsResponse) -> wire.ModelList:
    return {"object": "list", "data": [model_json(m) for m in res.models]}
