"""OpenAI REST <-> proto.  Requests in, responses out; no I/O here.

Shapes follow the OpenAI API reference; the official ``openai`` package is the
judge in tests.  Deliberate choices:

- ``tool_choice``: "none" drops the tools; "auto" passes them; "required"
  passes them and forces a call (ToolChoice REQUIRED); a named function keeps
  only that tool and forces a call to it (ToolChoice FUNCTION).  Forcing is
  the backend's: the MLX engine does it with a grammar (one call) for tool-call
  formats it knows and refuses otherwise (400).  Forcing plus a JSON
  ``response_format`` is 400.
- ``n`` > 1 runs n generations concurrently; with a ``seed``, choice i uses
  seed + i so the choices differ yet stay reproducible.
- ``/v1/completions`` sends the prompt raw (no chat template), as OpenAI's
  legacy completions do; ``echo`` and ``best_of`` other than n are 400.
- Embeddings ``input`` may be token ids (an array of ints, or of arrays of
  ints): they are the model's own tokenizer's ids, taken for models this
  server runs (MLX) and refused (400) for a model only an upstream Ollama or a
  cloud API serves.  Token-array *prompts* on /v1/completions are 400: send text.
- Extensions accepted beyond OpenAI's fields: ``top_k``, ``min_p``,
  ``repeat_penalty``.
- Reasoning models: the reasoning comes back as ``reasoning_content`` beside
  ``content`` (message and stream deltas; DeepSeek's and vLLM's convention),
  present only when there is some.  ``reasoning_effort`` "minimal", "low",
  "medium" or "high" asks for thinking (the level itself is not honoured),
  "none" for none; absent leaves it to the model.  Assistant messages may
  carry ``reasoning_content`` back.  Fields without meaning here (``user``, ``logit_bias``,
  ``store``, ``metadata``, ``parallel_tool_calls``, ...) are ignored.
- The last chunk of a stream carries an extra ``backend`` field (the
  backend that answered); non-streaming answers carry it in the
  ``x-mlxgate-backend`` header and the ``system_fingerprint``.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from backends.types import (
    Chunk,
    Done,
    Message,
    OutputFormat,
    Prompt,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
)
from gateway.common import Collected, parse_arguments, parse_tools
from gateway.errors import ApiError, bad_request
from gateway.fields import INT64_MAX, INT64_MIN, Body, item
from mlxgate.v1 import inference_pb2 as pb

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}

#: Fields OpenAI defines that have no meaning here; accepted and ignored.
_IGNORED = (
    "user",
    "logit_bias",
    "store",
    "metadata",
    "parallel_tool_calls",
    "service_tier",
    "modalities",
    "audio",
    "prediction",
    "verbosity",
    "web_search_options",
    "prompt_cache_key",
    "safety_identifier",
    "functions",
    "function_call",
)


#: Generations one request may start (n, times the prompts of /v1/completions):
#: one caller must not fill the engine's whole queue.
MAX_CHOICES = 128


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def fingerprint(backend: str) -> str:
    return f"fp_mlxgate_{backend.replace(':', '_')}" if backend else "fp_mlxgate"


# ---------------------------------------------------------------- shared request parts


def _sampling(b: Body) -> Sampling:
    s = Sampling(
        temperature=b.float("temperature", lo=0, hi=2),
        top_p=b.float("top_p", lo=0, hi=1),
        presence_penalty=b.float("presence_penalty", lo=-2, hi=2),
        frequency_penalty=b.float("frequency_penalty", lo=-2, hi=2),
        seed=b.int("seed", lo=INT64_MIN, hi=INT64_MAX),
        top_k=b.int("top_k", lo=0),
        min_p=b.float("min_p", lo=0, hi=1),
        repeat_penalty=b.float("repeat_penalty", lo=0),
    )
    s.stop = b.str_or_list("stop") or []
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
    extra: dict[str, Any] = field(default_factory=dict)

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


def _stream_flags(b: Body) -> tuple[bool, bool]:
    stream = bool(b.bool("stream", False))
    so = b.obj("stream_options")
    include_usage = bool(so.bool("include_usage", False)) if so is not None else False
    return stream, include_usage


# ---------------------------------------------------------------- chat


def _data_url(url: str, name: str) -> bytes:
    if not url.startswith("data:"):
        raise bad_request(
            f"{name}: only data: URLs (base64) are supported for images; this server does not fetch URLs",
            param=name,
        )
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise bad_request(f"{name}: the data: URL must be base64-encoded", param=name)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{name}: invalid base64 in data: URL", param=name) from None


def _content(v: Any, name: str, allow_images: bool) -> tuple[str, list[bytes]]:
    if v is None:
        return "", []
    if isinstance(v, str):
        return v, []
    if not isinstance(v, list):
        raise bad_request(f"{name} must be a string or an array of content parts", param=name)
    texts: list[str] = []
    images: list[bytes] = []
    for i, part in enumerate(v):
        pname = f"{name}[{i}]"
        p = item(part, pname)
        kind = p.str("type", required=True)
        if kind == "text":
            texts.append(p.str("text", "") or "")
        elif kind == "image_url" and allow_images:
            iu = p.raw("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise bad_request(f"{pname}.image_url.url must be a string", param=f"{pname}.image_url")
            images.append(_data_url(url, f"{pname}.image_url.url"))
        elif kind == "refusal":
            texts.append(p.str("refusal", "") or "")
        else:
            raise bad_request(f"{pname}.type {kind!r} is not supported here", param=f"{pname}.type")
    return "".join(texts), images


_ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def parse_messages(values: list[Any]) -> list[Message]:
    out: list[Message] = []
    names_by_id: dict[str, str] = {}
    for i, v in enumerate(values):
        name = f"messages[{i}]"
        m = item(v, name)
        role_raw = m.str("role", required=True)
        role = _ROLE_MAP.get(role_raw or "")
        if role is None:
            raise bad_request(
                f"{name}.role must be one of system, developer, user, assistant, tool; got {role_raw!r}",
                param=f"{name}.role",
            )
        text, images = _content(m.raw("content"), f"{name}.content", allow_images=role == "user")
        calls: list[ToolCall] = []
        for j, c in enumerate(m.list("tool_calls") or []):
            tc = item(c, f"{name}.tool_calls[{j}]")
            fn = tc.obj("function")
            if fn is None:
                raise bad_request(f"{tc.name('function')} is required", param=tc.name("function"))
            call = ToolCall(
                name=fn.str("name", required=True) or "",
                arguments=parse_arguments(fn.raw("arguments"), fn.name("arguments")),
                id=tc.str("id", "") or "",
                index=j,
            )
            if call.id:
                names_by_id[call.id] = call.name
            calls.append(call)
        tool_call_id = m.str("tool_call_id", "") or ""
        thinking = m.str("reasoning_content", "") or ""
        m.ignore("name", "refusal", "audio", "function_call")
        out.append(
            Message(
                role=role,  # type: ignore[arg-type]
                content=text,
                images=images,
                tool_calls=calls,
                tool_call_id=tool_call_id,
                tool_name=names_by_id.get(tool_call_id, ""),
                thinking=thinking,
            )
        )
    return out


def _response_format(b: Body) -> OutputFormat:
    rf = b.obj("response_format")
    if rf is None:
        return OutputFormat()
    kind = rf.str("type", required=True)
    if kind == "text":
        return OutputFormat()
    if kind == "json_object":
        return OutputFormat("json")
    if kind == "json_schema":
        js = rf.obj("json_schema")
        if js is None:
            raise bad_request("response_format.json_schema is required", param="response_format.json_schema")
        schema = js.obj("schema")
        js.ignore("name", "strict", "description")
        return OutputFormat("json_schema", schema.data) if schema is not None else OutputFormat("json")
    raise bad_request(
        f"response_format.type must be text, json_object or json_schema; got {kind!r}",
        param="response_format.type",
    )


def _tool_choice(b: Body, tools: list[Tool]) -> tuple[list[Tool], ToolChoice]:
    """The tools to send and whether a call is forced.

    "none" sends no tools; "auto" (or absent) sends them unforced; "required"
    forces a call to one of them; a named function keeps only that tool and
    forces a call to it.
    """
    tc = b.raw("tool_choice")
    if tc is None or tc == "auto":
        return tools, ToolChoice()
    if tc == "none":
        return [], ToolChoice()
    if tc == "required":
        if not tools:
            raise bad_request('tool_choice "required" needs tools', param="tool_choice")
        return tools, ToolChoice("required")
    if isinstance(tc, dict):
        fn = tc.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise bad_request("tool_choice.function.name is required", param="tool_choice")
        chosen = [t for t in tools if t.name == name]
        if not chosen:
            raise bad_request(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        return chosen, ToolChoice("function", name)
    raise bad_request('tool_choice must be "none", "auto", "required" or a function', param="tool_choice")


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


def _think(b: Body) -> Optional[bool]:
    effort = b.raw("reasoning_effort")
    if effort is None:
        return None
    if effort not in REASONING_EFFORTS:
        raise bad_request(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}; got {effort!r}",
            param="reasoning_effort",
        )
    return effort != "none"


def chat_request(data: dict[str, Any]) -> Parsed:
    b = Body(data)
    model = b.str("model", required=True) or ""
    raw_msgs = b.list("messages")
    if not raw_msgs:
        raise bad_request("messages is required and must be a non-empty array", param="messages")
    messages = parse_messages(raw_msgs)
    tools, choice = _tool_choice(b, parse_tools(b.list("tools")))
    fmt = _response_format(b)
    if choice.forced and fmt.kind != "text":
        raise bad_request(
            f"tool_choice {choice.describe()} cannot be combined with response_format {fmt.kind}",
            param="tool_choice",
        )
    sampling = _sampling(b)
    max_tokens = b.int("max_tokens", lo=1)
    mct = b.int("max_completion_tokens", lo=1)
    sampling.max_tokens = mct if mct is not None else max_tokens
    n = b.int("n", 1, lo=1, hi=MAX_CHOICES) or 1
    logprobs = bool(b.bool("logprobs", False))
    top = b.int("top_logprobs", 0, lo=0, hi=20) or 0
    if top and not logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    stream, include_usage = _stream_flags(b)
    req = pb.GenerateRequest(
        model=model,
        tools=[t.to_pb() for t in tools],
        sampling=sampling.to_pb(),
        format=fmt.to_pb(),
        logprobs=logprobs,
        top_logprobs=top,
    )
    if choice.forced:
        req.tool_choice.CopyFrom(choice.to_pb())
    req.chat.CopyFrom(pb.ChatInput(messages=[m.to_pb() for m in messages]))
    think = _think(b)
    if think is not None:
        req.think = think
    b.ignore(*_IGNORED)
    b.log_unknown("/v1/chat/completions")
    return Parsed(model, [req], n, stream, include_usage, sampling.seed)


# ---------------------------------------------------------------- completions


def _texts(b: Body, name: str) -> list[str]:
    """A string or a non-empty list of strings (/v1/completions: token-array prompts are refused)."""
    v = b.raw(name)
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(isinstance(s, str) for s in v):
        return list(v)
    if isinstance(v, list) and v and all(isinstance(s, (int, list)) for s in v):
        raise bad_request(f"{name}: token arrays are not supported here; send text", param=name)
    if v is None:
        raise bad_request(f"{name} is required", param=name)
    raise bad_request(f"{name} must be a string or a non-empty array of strings", param=name)


INT32_MAX = 2**31 - 1


def _is_token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(v: Any, name: str) -> list[int]:
    """One input given as token ids: a non-empty array of integers in the id range."""
    if not isinstance(v, list) or not v or not all(_is_token_id(t) for t in v):
        raise bad_request(f"{name} must be a non-empty array of token ids (integers)", param="input")
    bad = next((t for t in v if not 0 <= t <= INT32_MAX), None)
    if bad is not None:
        raise bad_request(f"{name}: token ids are integers from 0 to {INT32_MAX}, got {bad}", param="input")
    return v


def _embedding_input(b: Body) -> tuple[list[str], list[list[int]]]:
    """(texts, token-id inputs): OpenAI's ``input`` is a string, an array of
    strings, an array of token ids (one input) or an array of such arrays.
    Whether the ids fit the model is the backend's to say."""
    v = b.raw("input")
    if v is None:
        raise bad_request("input is required", param="input")
    if isinstance(v, str):
        return [v], []
    if not isinstance(v, list) or not v:
        raise bad_request(
            "input must be a string, or a non-empty array of strings, of token ids or of arrays of token ids",
            param="input",
        )
    if all(isinstance(t, str) for t in v):
        return list(v), []
    if all(_is_token_id(t) for t in v):
        return [], [_token_ids(v, "input")]
    if all(isinstance(t, list) for t in v):
        return [], [_token_ids(t, f"input[{i}]") for i, t in enumerate(v)]
    raise bad_request("input: an array holds strings, token ids or arrays of token ids, one kind only", param="input")


def completion_request(data: dict[str, Any]) -> Parsed:
    b = Body(data)
    model = b.str("model", required=True) or ""
    prompts = _texts(b, "prompt")
    if b.bool("echo", False):
        raise bad_request("echo is not supported", param="echo")
    n = b.int("n", 1, lo=1, hi=MAX_CHOICES) or 1
    best_of = b.int("best_of", lo=1)
    if best_of is not None and best_of != n:
        raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
    sampling = _sampling(b)
    sampling.max_tokens = b.int("max_tokens", lo=1)
    top = b.int("logprobs", lo=0, hi=5)
    suffix = b.str("suffix", "") or ""
    stream, include_usage = _stream_flags(b)
    base = []
    for p in prompts:
        r = pb.GenerateRequest(model=model, sampling=sampling.to_pb(), logprobs=top is not None, top_logprobs=top or 0)
        r.prompt.CopyFrom(Prompt(prompt=p, suffix=suffix, raw=True).to_pb())
        base.append(r)
    if len(base) * n > MAX_CHOICES:
        raise bad_request(
            f"prompt × n asks for {len(base) * n} completions; at most {MAX_CHOICES} per request", param="n"
        )
    b.ignore(*_IGNORED)
    b.log_unknown("/v1/completions")
    return Parsed(model, base, n, stream, include_usage, sampling.seed, logprobs=-1 if top is None else top)


# ---------------------------------------------------------------- responses


def finish_reason(done: Done, had_tool_calls: bool) -> str:
    """"tool_calls" when the answer has calls, unless it was cut: a call an
    upstream cut short comes with "length", as OpenAI marks it, so a client
    never runs a call whose arguments were truncated."""
    if done.finish_reason == "error":
        raise ApiError(500, done.error_message or "generation failed")
    if had_tool_calls and done.finish_reason != "length":
        return "tool_calls"
    return _FINISH.get(done.finish_reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def usage_of(dones: list[Done], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (every n-th Done), completions all."""
    prompt = sum(d.prompt_tokens for d in dones[::n])
    cached = sum(d.cached_prompt_tokens for d in dones[::n])
    return usage(prompt, sum(d.completion_tokens for d in dones), cached)


def chat_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())} for t in lp.top
                ],
            }
            for lp in lps
        ],
        "refusal": None,
    }


def completion_logprobs(lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for c in calls
    ]


def chat_completion(p: Parsed, results: list[Collected]) -> dict[str, Any]:
    choices = []
    for i, r in enumerate(results):
        msg: dict[str, Any] = {"role": "assistant", "content": r.text, "refusal": None}
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
    return _whole_answer("chatcmpl", "chat.completion", p, choices, results)


def _whole_answer(
    id_prefix: str, obj: str, p: Parsed, choices: list[dict[str, Any]], results: list[Collected]
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


def completion(p: Parsed, results: list[Collected]) -> dict[str, Any]:
    choices = []
    for i, r in enumerate(results):
        choices.append(
            {
                "index": i,
                "text": r.text,
                "finish_reason": finish_reason(r.done, False),
                "logprobs": completion_logprobs(r.logprobs) if p.logprobs >= 0 else None,
            }
        )
    return _whole_answer("cmpl", "text_completion", p, choices, results)


class ChatStream:
    """Renders (choice index, event) pairs into chat.completion.chunk objects."""

    object = "chat.completion.chunk"

    def __init__(self, p: Parsed) -> None:
        self.p = p
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.started: set[int] = set()
        self.tool_index: dict[int, int] = {}
        self.dones: dict[int, Done] = {}
        self.offsets: dict[int, int] = {}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
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

    def _choice(self, i: int, delta: dict[str, Any], ch: Optional[Chunk], finish: Optional[str]) -> dict[str, Any]:
        lps = chat_logprobs(ch.logprobs) if ch is not None and ch.logprobs else None
        return {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}

    def render(self, item: tuple[int, Any]) -> list[dict[str, Any]]:
        i, ev = item
        out = []
        if i not in self.started:
            self.started.add(i)
            out.append(self._chunk([self._choice(i, {"role": "assistant", "content": ""}, None, None)]))
        if isinstance(ev, Done):
            finish = finish_reason(ev, i in self.tool_index)
            self.dones[i] = ev
            last = self._chunk([self._choice(i, {}, None, finish)])
            last["backend"] = ev.backend
            out.append(last)
            return out
        if ev.thinking:
            out.append(self._chunk([self._choice(i, {"reasoning_content": ev.thinking}, None, None)]))
        if ev.tool_calls:
            calls = []
            for c in ev.tool_calls:
                k = self.tool_index.get(i, 0)
                self.tool_index[i] = k + 1
                d = tool_calls_json([c])[0]
                d["index"] = k
                calls.append(d)
            out.append(self._chunk([self._choice(i, {"tool_calls": calls}, None, None)]))
        if ev.text or ev.logprobs:
            out.append(self._chunk([self._choice(i, {"content": ev.text}, ev, None)]))
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

    def render(self, item: tuple[int, Any]) -> list[dict[str, Any]]:
        i, ev = item
        if isinstance(ev, Done):
            self.dones[i] = ev
            choice = {"index": i, "text": "", "logprobs": None, "finish_reason": finish_reason(ev, False)}
            last = self._chunk([choice])
            last["backend"] = ev.backend
            return [last]
        if not (ev.text or ev.logprobs):
            return []
        off = self.offsets.get(i, 0)
        self.offsets[i] = off + len(ev.text)
        lps = completion_logprobs(ev.logprobs, off) if self.p.logprobs >= 0 else None
        return [self._chunk([{"index": i, "text": ev.text, "logprobs": lps, "finish_reason": None}])]


# ---------------------------------------------------------------- embeddings


@dataclass
class ParsedEmbeddings:
    model: str
    req: pb.EmbedRequest
    base64: bool


def embeddings_request(data: dict[str, Any]) -> ParsedEmbeddings:
    b = Body(data)
    model = b.str("model", required=True) or ""
    texts, token_inputs = _embedding_input(b)
    fmt = b.str("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad_request(f"encoding_format must be float or base64; got {fmt!r}", param="encoding_format")
    dims = b.int("dimensions", 0, lo=1) or 0
    b.ignore("user")
    b.log_unknown("/v1/embeddings")
    # OpenAI refuses an input longer than the model's context (400); it never cuts it silently.
    req = pb.EmbedRequest(
        model=model,
        input=texts,
        input_tokens=[pb.TokenIds(ids=ids) for ids in token_inputs],
        dimensions=dims,
        truncate=False,
    )
    return ParsedEmbeddings(model, req, fmt == "base64")


def embeddings_response(p: ParsedEmbeddings, res: pb.EmbedResponse) -> dict[str, Any]:
    data = []
    for i, e in enumerate(res.embeddings):
        values = list(e.values)
        emb: Any = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() if p.base64 else values
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": p.model,
        "usage": {"prompt_tokens": res.prompt_tokens, "total_tokens": res.prompt_tokens},
    }


# ---------------------------------------------------------------- models


def model_json(m: pb.ModelInfo) -> dict[str, Any]:
    created = m.modified_at.seconds if m.HasField("modified_at") else 0
    return {"id": m.name, "object": "model", "created": created, "owned_by": m.backend}


def models_response(res: pb.ListModelsResponse) -> dict[str, Any]:
    return {"object": "list", "data": [model_json(m) for m in res.models]}
