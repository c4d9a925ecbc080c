"""Ollama REST <-> proto.  Requests in, responses out; no I/O here.

The wire format is declared once, in ``mlxgate/dialects/ollama.py`` (request
models, response shapes, option names, done reasons); this module only maps
it onto the contract: a parsed request becomes a ``pb.GenerateRequest`` /
``pb.EmbedRequest``, and ``pb.Chunk`` / ``pb.Done`` events become the
dialect's response dicts.  The contract's limits are checked by the inference
service, once, for every caller; what is checked here is Ollama's own rules.

Deliberate choices (gateway/README.md lists them all): ``num_predict`` < 0
(Ollama's -1 "no limit" and -2 "fill the context") is sent as max_tokens -1,
until a stop or the context is full, whatever the server's default; model
names in ``/api/tags``, ``/api/ps`` and ``/api/show``'s modelfile carry a tag
(``name:latest`` unless the name has one, ``mlxgate.names.tagged``), as
Ollama's do, while gRPC and the OpenAI dialect keep plain names.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Optional, Union

from pydantic import TypeAdapter, ValidationError

from gateway.errors import bad_request
from gateway.events import check_done, finish_of
from gateway.parsing import parse
from gateway.times import duration, rfc3339, time_of
from gateway.tools import tools_pb
from mlxgate import jsonutil, limits
from mlxgate.dialects import ollama as wire
from mlxgate.dialects.base import produced_arguments, wire_error
from mlxgate.names import tagged
from mlxgate.v1 import inference_pb2 as pb

#: Version reported by GET /api/version.
OLLAMA_COMPAT_VERSION = wire.VERSION

log = logging.getLogger(__name__)

_ROLE = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}

_KEEP_ALIVE: TypeAdapter[Optional[float]] = TypeAdapter(Optional[wire.KeepAlive])  # type: ignore[arg-type]


def parse_keep_alive(v: Any, name: str = "keep_alive") -> Optional[float]:
    """Seconds; None = default; 0 = unload after; negative (any) = -1, keep loaded."""
    try:
        return _KEEP_ALIVE.validate_python(v, strict=True)
    except ValidationError as e:
        msg = wire_error(e, {name: v}).message
        raise bad_request(msg if msg.startswith(name) else f"{name}: {msg}", param=name) from None


def parse_think(v: Union[bool, str, None]) -> Optional[bool]:
    """Ollama's think: a boolean, or a level (newer Ollama) that means true here."""
    return v if v is None or isinstance(v, bool) else True


def sampling(opts: Optional[wire.Options]) -> pb.SamplingParams:
    """Options onto the contract's sampling (a negative seed is random, a negative num_predict no limit)."""
    s = pb.SamplingParams()
    if opts is None:
        return s
    for field, option in wire.OPTION_OF_SAMPLING.items():
        v = getattr(opts, option)
        if v is None or (field == "seed" and v < 0):
            continue  # a negative seed is random
        if field == "num_ctx" and v < wire.MIN_NUM_CTX:
            # Ollama's scheduler raises a smaller context to its minimum.
            log.warning("options.num_ctx %d is below the minimum context: using num_ctx %d", v, wire.MIN_NUM_CTX)
            v = wire.MIN_NUM_CTX
        # A negative num_predict (Ollama's -1 and -2) is "no limit": until a
        # stop or the context is full, whatever the server's default.
        setattr(s, field, max(v, -1) if field == "max_tokens" else v)
    s.stop.extend(opts.stops())
    return s


def output_format(v: Union[str, dict, None]) -> pb.OutputFormat:
    if not v:
        return pb.OutputFormat()
    if v == "json":
        return pb.OutputFormat(type=pb.FORMAT_TYPE_JSON)
    return pb.OutputFormat(type=pb.FORMAT_TYPE_JSON_SCHEMA, json_schema=jsonutil.dumps(v))


def _common(r: Union[wire.GenerateRequest, wire.ChatRequest], req: pb.GenerateRequest) -> tuple[bool, Optional[float]]:
    """Fields /api/generate and /api/chat share; fills req, returns (stream, keep_alive)."""
    req.sampling.CopyFrom(sampling(r.options))
    req.format.CopyFrom(output_format(r.format))
    ka = duration(r.keep_alive)
    if ka is not None:
        req.keep_alive.CopyFrom(ka)
    req.logprobs = bool(r.logprobs)
    req.top_logprobs = r.top_logprobs or 0
    think = parse_think(r.think)
    if think is not None:
        req.think = think
    # Ollama's default: a prompt too long for the context loses its oldest
    # messages (or its start); "truncate": false asks for a 400 instead.
    req.truncate = r.truncate is not False
    return r.stream is not False, r.keep_alive


@dataclass
class Parsed:
    """A parsed /api/generate or /api/chat request."""

    model: str
    req: pb.GenerateRequest
    stream: bool
    keep_alive: Optional[float]
    #: Empty prompt / no messages: only load (or, with keep_alive 0, unload).
    load_only: bool


def generate_request(data: dict[str, Any]) -> Parsed:
    r = parse(wire.GenerateRequest, data, "/api/generate")
    raw = bool(r.raw)
    if r.template and not raw:
        raise bad_request(
            "template: custom prompt templates are not supported (models use their own chat template); "
            "send raw=true with a fully formatted prompt instead",
            param="template",
        )
    req = pb.GenerateRequest(model=r.model)
    req.prompt.SetInParent()
    p = req.prompt
    p.prompt, p.suffix, p.system, p.raw = r.prompt or "", r.suffix or "", r.system or "", raw
    p.images.extend(r.images or ())
    stream, keep_alive = _common(r, req)
    return Parsed(r.model, req, stream, keep_alive, load_only=not r.prompt)


@functools.lru_cache(maxsize=1)
def _note_dropped_call() -> None:
    """Logged once per process: a client replays the same history every turn."""
    log.warning("/api/chat: dropping assistant tool calls without a function or a function name from the "
                "history (logged once)")


def _history_calls(m: wire.Message, i: int) -> list[pb.ToolCall]:
    """The calls of an assistant's history that can be kept: one without a function or
    a name was the model's doing earlier, so it is dropped, not refused (as Ollama).
    The contract's count applies to what the caller sent, so it is checked here, before
    dropping, in the service's words (the service sees only the calls kept)."""
    calls = m.tool_calls or ()
    if len(calls) > limits.MAX_TOOL_CALLS:
        raise bad_request(f"messages[{i}].tool_calls: at most {limits.MAX_TOOL_CALLS} allowed, got {len(calls)}",
                          param=f"messages[{i}].tool_calls")
    out = []
    for j, c in enumerate(calls):
        f = c.function
        if f is None or not f.name:
            _note_dropped_call()
            continue
        out.append(pb.ToolCall(
            id=c.id or "",
            name=f.name,
            arguments_json=jsonutil.dumps(f.arguments or {}),
            index=j if f.index is None else f.index,
        ))
    return out


def message_pb(m: wire.Message, i: int) -> pb.ChatMessage:
    return pb.ChatMessage(
        role=_ROLE[m.role],
        content=m.content or "",
        images=m.images or (),
        tool_calls=_history_calls(m, i),
        tool_name=m.tool_name or "",
        thinking=m.thinking or "",
    )


def chat_request(data: dict[str, Any]) -> Parsed:
    r = parse(wire.ChatRequest, data, "/api/chat")
    req = pb.GenerateRequest(model=r.model, tools=tools_pb(r.tools))
    req.chat.SetInParent()
    req.chat.messages.extend(message_pb(m, i) for i, m in enumerate(r.messages or ()))
    stream, keep_alive = _common(r, req)
    return Parsed(r.model, req, stream, keep_alive, load_only=not r.messages)


# ---------------------------------------------------------------- responses


def done_fields(done: pb.Done) -> dict[str, Any]:
    return {
        "done": True,
        "done_reason": wire.DONE_REASON.get(finish_of(done), "stop"),
        "total_duration": done.total_duration_ns,
        "load_duration": done.load_duration_ns,
        "prompt_eval_count": done.prompt_tokens,
        "prompt_eval_duration": done.prompt_eval_duration_ns,
        "eval_count": done.completion_tokens,
        "eval_duration": done.eval_duration_ns,
        "backend": done.backend,
    }


def logprobs_json(lps: Iterable[pb.TokenLogprob]) -> list[wire.Logprob]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.token.encode()),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())} for t in lp.top_logprobs
            ],
        }
        for lp in lps
    ]


def tool_calls_json(calls: Iterable[pb.ToolCall]) -> list[wire.ResponseToolCall]:
    out: list[wire.ResponseToolCall] = []
    for c in calls:
        d: wire.ResponseToolCall = {
            "function": {"index": c.index, "name": c.name, "arguments": produced_arguments(c.arguments_json)}
        }
        if c.id:
            d["id"] = c.id
        out.append(d)
    return out


def generate_chunk(model: str, ch: pb.Chunk) -> wire.GenerateResponse:
    d: wire.GenerateResponse = {"model": model, "created_at": rfc3339(), "response": ch.text, "done": False}
    if ch.thinking:
        d["thinking"] = ch.thinking
    if ch.logprobs:
        d["logprobs"] = logprobs_json(ch.logprobs)
    return d


def generate_final(
    model: str, done: pb.Done, text: str = "", logprobs: Iterable[pb.TokenLogprob] = (), thinking: str = ""
) -> wire.GenerateResponse:
    check_done(done)
    d: dict[str, Any] = {"model": model, "created_at": rfc3339(), "response": text}
    if thinking:
        d["thinking"] = thinking
    d.update(done_fields(done))
    lps = logprobs_json(logprobs)
    if lps:
        d["logprobs"] = lps
    return d  # type: ignore[return-value]


def chat_chunk(model: str, ch: pb.Chunk) -> wire.ChatResponse:
    msg: wire.ResponseMessage = {"role": "assistant", "content": ch.text}
    if ch.thinking:
        msg["thinking"] = ch.thinking
    if ch.tool_calls:
        msg["tool_calls"] = tool_calls_json(ch.tool_calls)
    d: wire.ChatResponse = {"model": model, "created_at": rfc3339(), "message": msg, "done": False}
    if ch.logprobs:
        d["logprobs"] = logprobs_json(ch.logprobs)
    return d


def chat_final(
    model: str,
    done: pb.Done,
    text: str = "",
    tool_calls: Iterable[pb.ToolCall] = (),
    logprobs: Iterable[pb.TokenLogprob] = (),
    thinking: str = "",
) -> wire.ChatResponse:
    check_done(done)
    msg: wire.ResponseMessage = {"role": "assistant", "content": text}
    if thinking:
        msg["thinking"] = thinking
    calls = tool_calls_json(tool_calls)
    if calls:
        msg["tool_calls"] = calls
    d: dict[str, Any] = {"model": model, "created_at": rfc3339(), "message": msg}
    d.update(done_fields(done))
    lps = logprobs_json(logprobs)
    if lps:
        d["logprobs"] = lps
    return d  # type: ignore[return-value]


def load_answer(model: str, chat: bool, unloaded: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"model": model, "created_at": rfc3339()}
    if chat:
        d["message"] = {"role": "assistant", "content": ""}
    else:
        d["response"] = ""
    d["done"] = True
    d["done_reason"] = "unload" if unloaded else "load"
    return d


# ---------------------------------------------------------------- embeddings


@dataclass
class ParsedEmbed:
    model: str
    req: pb.EmbedRequest
    keep_alive: Optional[float]


def _embed_pb(model: str, inputs: list[str], keep_alive: Optional[float], **kw: Any) -> pb.EmbedRequest:
    req = pb.EmbedRequest(model=model, input=inputs, **kw)
    ka = duration(keep_alive)
    if ka is not None:
        req.keep_alive.CopyFrom(ka)
    return req


def embed_request(data: dict[str, Any]) -> ParsedEmbed:
    r = parse(wire.EmbedRequest, data, "/api/embed")
    req = _embed_pb(r.model, r.inputs(), r.keep_alive, truncate=r.truncate is not False, dimensions=r.dimensions or 0)
    return ParsedEmbed(r.model, req, r.keep_alive)


def legacy_embeddings_request(data: dict[str, Any]) -> ParsedEmbed:
    r = parse(wire.EmbeddingsRequest, data, "/api/embeddings")
    req = _embed_pb(r.model, [r.prompt] if r.prompt else [], r.keep_alive, truncate=True)
    return ParsedEmbed(r.model, req, r.keep_alive)


def embed_response(model: str, res: pb.EmbedResponse) -> wire.EmbedResponse:
    return {
        "model": model,
        "embeddings": [list(e.values) for e in res.embeddings],
        "total_duration": res.total_duration_ns,
        "load_duration": res.load_duration_ns,
        "prompt_eval_count": res.prompt_tokens,
    }


# ---------------------------------------------------------------- models


def details_json(d: pb.ModelDetails) -> wire.Details:
    return {
        "parent_model": "",
        "format": d.format or "mlx",
        "family": d.family,
        "families": list(d.families) or ([d.family] if d.family else None),
        "parameter_size": d.parameter_size,
        "quantization_level": d.quantization_level,
    }


def tags_response(res: pb.ListModelsResponse) -> wire.TagsResponse:
    """Names carry a tag (``tiny-llama:latest``), as Ollama lists them (mlxgate.names)."""
    return {
        "models": [
            {
                "name": tagged(m.name),
                "model": tagged(m.name),
                "modified_at": time_of(m, "modified_at"),
                "size": m.size_bytes,
                "digest": m.digest,
                "details": details_json(m.details),
                "backend": m.backend,
            }
            for m in res.models
        ]
    }


def show_request(data: dict[str, Any]) -> str:
    r = parse(wire.ShowRequest, data, "/api/show")
    model = r.model or r.name or ""
    if not model:
        raise bad_request("model is required", param="model")
    return model


def _config(res: pb.ShowModelResponse) -> dict[str, Any]:
    try:
        return jsonutil.loads_object(res.config_json, "config_json")
    except jsonutil.JSONError:
        return {}


_ROLE_NAME = {v: k for k, v in _ROLE.items()}


def _parameter_lines(res: pb.ShowModelResponse) -> list[tuple[str, str]]:
    """(option, value) pairs as a Modelfile's PARAMETER lines give them: the
    model's own parameters (a managed model's), else its context length."""
    s = res.parameters
    pairs: list[tuple[str, str]] = []
    for field, option in wire.OPTION_OF_SAMPLING.items():
        if s.HasField(field):
            v = getattr(s, field)
            pairs.append((option, f"{v:g}" if isinstance(v, float) else str(v)))
    pairs.extend(("stop", jsonutil.dumps(x)) for x in s.stop)
    if res.context_length and not s.HasField("num_ctx"):
        pairs.append(("num_ctx", str(res.context_length)))
    return pairs


def _quoted(text: str) -> str:
    return f'"""{text}"""'


def _modelfile(res: pb.ShowModelResponse) -> str:
    """A Modelfile that would recreate the model with ``ollama create`` (FROM
    its base for a created model, else the model itself)."""
    lines = [
        "# Modelfile generated by mlxgate",
        f"FROM {tagged(res.parent_model or res.model.name)}",
    ]
    if res.chat_template:
        lines.append(f"TEMPLATE {_quoted(res.chat_template)}")
    if res.system:
        lines.append(f"SYSTEM {_quoted(res.system)}")
    lines.extend(f"PARAMETER {k} {v}" for k, v in _parameter_lines(res))
    lines.extend(f"MESSAGE {_ROLE_NAME.get(m.role, 'user')} {_quoted(m.content)}" for m in res.messages)
    if res.license:
        lines.append(f"LICENSE {_quoted(res.license)}")
    return "\n".join(lines) + "\n"


def _model_info(res: pb.ShowModelResponse, cfg: dict[str, Any]) -> dict[str, Any]:
    arch = res.model.details.family or str(cfg.get("model_type", "")) or "unknown"
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": res.model.name,
        "general.parameter_count": res.model.details.parameter_count,
    }
    keys = {
        "context_length": res.context_length or cfg.get("max_position_embeddings"),
        "embedding_length": cfg.get("hidden_size"),
        "block_count": cfg.get("num_hidden_layers"),
        "feed_forward_length": cfg.get("intermediate_size"),
        "attention.head_count": cfg.get("num_attention_heads"),
        "attention.head_count_kv": cfg.get("num_key_value_heads"),
        "vocab_size": cfg.get("vocab_size"),
        "rope.freq_base": cfg.get("rope_theta"),
    }
    for k, v in keys.items():
        if v is not None:
            info[f"{arch}.{k}"] = v
    return info


_CAPABILITIES = {v: k.removeprefix("CAPABILITY_").lower() for k, v in pb.Capability.items() if v}


def show_response(res: pb.ShowModelResponse) -> wire.ShowResponse:
    """Ollama's show; ``parameters`` in its text form (``name value`` lines, padded as Ollama pads them)."""
    params = [f"{k:<30} {v}" for k, v in _parameter_lines(res)]
    answer: wire.ShowResponse = {
        "license": res.license,
        "modelfile": _modelfile(res),
        "parameters": "\n".join(params),
        "template": res.chat_template,
        "details": details_json(res.model.details),
        "model_info": _model_info(res, _config(res)),
        "capabilities": [_CAPABILITIES[c] for c in res.capabilities if c in _CAPABILITIES],
        "modified_at": time_of(res.model, "modified_at"),
        "backend": res.model.backend,
    }
    if res.system:
        answer["system"] = res.system
    if res.messages:
        answer["messages"] = [{"role": _ROLE_NAME.get(m.role, "user"), "content": m.content} for m in res.messages]
    if res.parent_model:
        answer["details"]["parent_model"] = res.parent_model
    return answer


#: Ollama reports models kept loaded forever with an expiry centuries away.
_FOREVER = timedelta(days=365 * 290)


def pull_request(data: dict[str, Any]) -> tuple[pb.PullModelRequest, bool]:
    """The PullModel request and whether to stream (Ollama's default: yes)."""
    r = parse(wire.PullRequest, data, "/api/pull")
    model = r.model or r.name or ""
    if not model:
        raise bad_request("model is required", param="model")
    return pb.PullModelRequest(model=model), r.stream is not False


def progress_line(p: pb.PullModelResponse) -> wire.ProgressResponse:
    line: wire.ProgressResponse = {"status": p.status}
    if p.digest:
        line["digest"] = p.digest
        line["total"] = p.total
        line["completed"] = p.completed
    return line


def ps_response(res: pb.ListRunningResponse) -> wire.PsResponse:
    models: list[wire.RunningModel] = []
    for m in res.models:
        if m.HasField("expires_at"):
            expires = time_of(m, "expires_at")
        else:
            expires = rfc3339(datetime.now(timezone.utc) + _FOREVER)
        models.append(
            {
                "name": tagged(m.name),
                "model": tagged(m.name),
                "size": m.size_bytes,
                "digest": "",
                "details": details_json(m.details),
                "expires_at": expires,
                # Unified memory (Apple Silicon): the whole model counts as accelerator memory.
                "size_vram": m.size_bytes,
                "context_length": m.context_length,
                "backend": m.backend,
            }
        )
    return {"models": models}
