"""Ollama REST <-> proto.  Requests in, responses out; no I/O here.

Field names and shapes follow Ollama's docs/api.md.  Deliberate choices:

- ``template`` (a Go template) cannot be honoured: models here carry Jinja
  chat templates.  A non-empty ``template`` without ``raw`` is a 400 saying
  so; send ``raw: true`` with a fully formatted prompt instead.
- ``context`` (deprecated) and the options without meaning for MLX
  (``num_gpu``, ``mirostat``, ``use_mmap``, ...) are accepted, type checked
  and ignored (logged at debug).  Unknown options are ignored too, as Ollama
  does.
- ``think``: true, or a level ("low", "medium", "high"; all mean true here),
  asks for thinking; false asks for none; absent leaves it to the model.
  Reasoning comes back in ``thinking`` (/api/generate) or
  ``message.thinking`` (/api/chat), present only when non-empty.
- ``num_predict`` < 0 (Ollama's -1 "no limit" and -2 "fill the context")
  is sent as max_tokens -1: generate until a stop or the context is full,
  whatever the server's default.  Absent leaves the default to the backend
  (MLX: ``default_max_tokens``, -1 unless configured, so the same).  There is
  no context shift: a full context ends the answer with ``done_reason``
  "length".
- Model names in ``/api/tags``, ``/api/ps`` and ``/api/show``'s modelfile carry
  a tag (``name:latest`` unless the name has one, ``mlxgate.names.tagged``),
  as Ollama's do, so clients matching ``ollama list`` names find them; the
  rest of mlxgate (gRPC, the OpenAI dialect) keeps the plain names, and
  requests may use either form.
- The final object of a generation carries an extra ``backend`` field (the
  backend that answered); non-streaming answers also carry it in the
  ``x-mlxgate-backend`` header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from backends.types import (
    Chunk,
    Done,
    EmbedRequest,
    Message,
    ModelInfo,
    ModelShow,
    OutputFormat,
    Prompt,
    RunningModel,
    Sampling,
    TokenLogprob,
    ToolCall,
    keep_alive_to_pb,
    normalize_keep_alive,
)
from gateway.common import parse_arguments, parse_tools, require_model, rfc3339
from gateway.errors import ApiError, bad_request
from gateway.fields import INT64_MAX, INT64_MIN, Body, b64_images, item
from mlxgate.config import parse_duration
from mlxgate.names import tagged
from mlxgate.v1 import inference_pb2 as pb

#: Version reported by GET /api/version: a recent Ollama whose API we follow,
#: so clients that gate features on the server version enable them.
OLLAMA_COMPAT_VERSION = "0.12.0"

# ---------------------------------------------------------------- keep_alive

def parse_keep_alive(v: Any, name: str = "keep_alive") -> Optional[float]:
    """Seconds; None = default; 0 = unload after; negative (any) = -1, keep loaded."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise bad_request(f"{name} must be a duration string or a number of seconds", param=name)
    if isinstance(v, (int, float)):
        secs = float(v)
    elif isinstance(v, str):
        try:
            secs = parse_duration(v)
        except ValueError:
            raise bad_request(
                f'{name}: invalid duration {v!r} (use e.g. "5m", "1h30m", "-1" or seconds)', param=name
            ) from None
    else:
        raise bad_request(f"{name} must be a duration string or a number of seconds", param=name)
    if math.isnan(secs):
        raise bad_request(f"{name} must be a duration string or a number of seconds", param=name)
    return normalize_keep_alive(secs)


# ---------------------------------------------------------------- options

_FLOAT_OPTS = {"temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"}
_INT_OPTS = {"top_k", "repeat_last_n", "num_ctx"}
_IGNORED_FLOAT = {"typical_p", "tfs_z", "mirostat_tau", "mirostat_eta"}
_IGNORED_INT = {"num_keep", "mirostat", "num_batch", "num_gpu", "main_gpu", "num_thread"}
_IGNORED_BOOL = {
    "penalize_newline",
    "numa",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
}
#: Every option name Ollama documents (Modelfile parameters + runner options),
#: and the integer and boolean ones among them (the rest are numbers, and stop).
KNOWN_OPTIONS = (
    _FLOAT_OPTS | _INT_OPTS | _IGNORED_FLOAT | _IGNORED_INT | _IGNORED_BOOL | {"seed", "num_predict", "stop"}
)
INT_OPTIONS = _INT_OPTS | _IGNORED_INT | {"seed", "num_predict"}
BOOL_OPTIONS = _IGNORED_BOOL


def parse_options(opts: Optional[Body]) -> Sampling:
    s = Sampling()
    if opts is None:
        return s
    for k in _FLOAT_OPTS:
        setattr(s, k, opts.float(k))
    for k in _INT_OPTS:
        setattr(s, k, opts.int(k))
    seed = opts.int("seed", lo=INT64_MIN, hi=INT64_MAX)
    s.seed = seed if seed is not None and seed >= 0 else None
    n = opts.int("num_predict")
    s.max_tokens = None if n is None else max(n, -1)
    s.stop = opts.str_or_list("stop") or []
    for k in _IGNORED_FLOAT:
        opts.float(k)
    for k in _IGNORED_INT:
        opts.int(k)
    for k in _IGNORED_BOOL:
        opts.bool(k)
    opts.log_unknown("options")
    return s


def parse_format(v: Any) -> OutputFormat:
    if v is None or v == "":
        return OutputFormat()
    if v == "json":
        return OutputFormat("json")
    if isinstance(v, dict):
        return OutputFormat("json_schema", v)
    raise bad_request('format must be "json" or a JSON schema object', param="format")


def _common(b: Body, req: pb.GenerateRequest) -> tuple[bool, Optional[float]]:
    """Fields /api/generate and /api/chat share; fills req, returns (stream, keep_alive)."""
    req.sampling.CopyFrom(parse_options(b.obj("options")).to_pb())
    req.format.CopyFrom(parse_format(b.raw("format")).to_pb())
    stream = b.bool("stream", True)
    keep_alive = parse_keep_alive(b.raw("keep_alive"))
    ka = keep_alive_to_pb(keep_alive)
    if ka is not None:
        req.keep_alive.CopyFrom(ka)
    req.logprobs = bool(b.bool("logprobs", False))
    req.top_logprobs = b.int("top_logprobs", 0, lo=0, hi=20) or 0
    think = parse_think(b.raw("think"))
    if think is not None:
        req.think = think
    # Ollama's default: a prompt too long for the context loses its oldest
    # messages (or its start); "truncate": false asks for a 400 instead.
    req.truncate = bool(b.bool("truncate", True))
    return bool(stream), keep_alive


THINK_LEVELS = ("low", "medium", "high")


def parse_think(v: Any) -> Optional[bool]:
    """Ollama's think: a boolean, or a level (newer Ollama) that means true here."""
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, str) and v in THINK_LEVELS:
        return True
    raise bad_request('think must be a boolean or one of "low", "medium", "high"', param="think")


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
    b = Body(data)
    model = require_model(b)
    prompt = b.str("prompt", "") or ""
    template = b.str("template", "") or ""
    raw = bool(b.bool("raw", False))
    if template and not raw:
        raise bad_request(
            "template: custom prompt templates are not supported (models use their own chat template); "
            "send raw=true with a fully formatted prompt instead",
            param="template",
        )
    p = Prompt(
        prompt=prompt,
        suffix=b.str("suffix", "") or "",
        system=b.str("system", "") or "",
        raw=raw,
        images=b64_images(b.list("images"), "images"),
    )
    req = pb.GenerateRequest(model=model)
    req.prompt.CopyFrom(p.to_pb())
    stream, keep_alive = _common(b, req)
    b.ignore("context")
    b.log_unknown("/api/generate")
    return Parsed(model, req, stream, keep_alive, load_only=not prompt)


_ROLES = ("system", "user", "assistant", "tool")


def parse_message(v: Any, name: str) -> Message:
    m = item(v, name)
    role = m.str("role", required=True)
    if role not in _ROLES:
        raise bad_request(f"{m.name('role')} must be one of {', '.join(_ROLES)}, got {role!r}", param=m.name("role"))
    calls: list[ToolCall] = []
    for j, c in enumerate(m.list("tool_calls") or []):
        tc = item(c, f"{name}.tool_calls[{j}]")
        fn = tc.obj("function")
        if fn is None:
            raise bad_request(f"{tc.name('function')} is required", param=tc.name("function"))
        calls.append(
            ToolCall(
                name=fn.str("name", required=True) or "",
                arguments=parse_arguments(fn.raw("arguments"), fn.name("arguments")),
                id=tc.str("id", "") or "",
                index=fn.int("index", j) or 0,
            )
        )
    msg = Message(
        role=role,  # type: ignore[arg-type]
        content=m.str("content", "") or "",
        images=b64_images(m.list("images"), m.name("images")),
        tool_calls=calls,
        tool_name=m.str("tool_name", "") or "",
        thinking=m.str("thinking", "") or "",
    )
    m.log_unknown("/api/chat")
    return msg


def chat_request(data: dict[str, Any]) -> Parsed:
    b = Body(data)
    model = require_model(b)
    raw_msgs = b.list("messages") or []
    messages = [parse_message(v, f"messages[{i}]") for i, v in enumerate(raw_msgs)]
    tools = parse_tools(b.list("tools"))
    req = pb.GenerateRequest(model=model, tools=[t.to_pb() for t in tools])
    req.chat.CopyFrom(pb.ChatInput(messages=[x.to_pb() for x in messages]))
    stream, keep_alive = _common(b, req)
    b.ignore("template")
    b.log_unknown("/api/chat")
    return Parsed(model, req, stream, keep_alive, load_only=not messages)


# ---------------------------------------------------------------- responses

_DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop", "cancelled": "stop"}


def check_done(done: Done) -> None:
    """A Done that reports a failure becomes an error answer."""
    if done.finish_reason == "error":
        raise ApiError(500, done.error_message or "generation failed")


def done_fields(done: Done) -> dict[str, Any]:
    return {
        "done": True,
        "done_reason": _DONE_REASON.get(done.finish_reason, "stop"),
        "total_duration": done.total_duration_ns,
        "load_duration": done.load_duration_ns,
        "prompt_eval_count": done.prompt_tokens,
        "prompt_eval_duration": done.prompt_eval_duration_ns,
        "eval_count": done.completion_tokens,
        "eval_duration": done.eval_duration_ns,
        "backend": done.backend,
    }


def logprobs_json(lps: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.token.encode()),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())} for t in lp.top],
        }
        for lp in lps
    ]


def tool_calls_json(calls: list[ToolCall]) -> list[dict[str, Any]]:
    out = []
    for c in calls:
        d: dict[str, Any] = {"function": {"index": c.index, "name": c.name, "arguments": c.arguments}}
        if c.id:
            d["id"] = c.id
        out.append(d)
    return out


def generate_chunk(model: str, ch: Chunk) -> dict[str, Any]:
    d: dict[str, Any] = {"model": model, "created_at": rfc3339(), "response": ch.text}
    if ch.thinking:
        d["thinking"] = ch.thinking
    d["done"] = False
    if ch.logprobs:
        d["logprobs"] = logprobs_json(ch.logprobs)
    return d


def generate_final(
    model: str, done: Done, text: str = "", logprobs: Optional[list] = None, thinking: str = ""
) -> dict[str, Any]:
    check_done(done)
    d: dict[str, Any] = {"model": model, "created_at": rfc3339(), "response": text}
    if thinking:
        d["thinking"] = thinking
    d.update(done_fields(done))
    if logprobs:
        d["logprobs"] = logprobs_json(logprobs)
    return d


def chat_chunk(model: str, ch: Chunk) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": ch.text}
    if ch.thinking:
        msg["thinking"] = ch.thinking
    if ch.tool_calls:
        msg["tool_calls"] = tool_calls_json(ch.tool_calls)
    d: dict[str, Any] = {"model": model, "created_at": rfc3339(), "message": msg, "done": False}
    if ch.logprobs:
        d["logprobs"] = logprobs_json(ch.logprobs)
    return d


def chat_final(
    model: str,
    done: Done,
    text: str = "",
    tool_calls: Optional[list[ToolCall]] = None,
    logprobs: Optional[list] = None,
    thinking: str = "",
) -> dict[str, Any]:
    check_done(done)
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        msg["thinking"] = thinking
    if tool_calls:
        msg["tool_calls"] = tool_calls_json(tool_calls)
    d: dict[str, Any] = {"model": model, "created_at": rfc3339(), "message": msg}
    d.update(done_fields(done))
    if logprobs:
        d["logprobs"] = logprobs_json(logprobs)
    return d


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
    req: EmbedRequest
    keep_alive: Optional[float]


def embed_request(data: dict[str, Any]) -> ParsedEmbed:
    b = Body(data)
    model = require_model(b)
    v = b.raw("input")
    if v is None:
        inputs: list[str] = []
    elif isinstance(v, str):
        inputs = [v]
    elif isinstance(v, list) and all(isinstance(s, str) for s in v):
        inputs = list(v)
    else:
        raise bad_request("input must be a string or an array of strings", param="input")
    keep_alive = parse_keep_alive(b.raw("keep_alive"))
    opts = b.obj("options")
    if opts is not None:
        parse_options(opts)  # type-checked; embeddings take no sampling options
    req = EmbedRequest(
        model=model,
        inputs=inputs,
        truncate=bool(b.bool("truncate", True)),
        dimensions=b.int("dimensions", 0, lo=0) or 0,
        keep_alive=keep_alive,
    )
    b.log_unknown("/api/embed")
    return ParsedEmbed(model, req, keep_alive)


def legacy_embeddings_request(data: dict[str, Any]) -> ParsedEmbed:
    b = Body(data)
    model = require_model(b)
    prompt = b.str("prompt", "") or ""
    keep_alive = parse_keep_alive(b.raw("keep_alive"))
    opts = b.obj("options")
    if opts is not None:
        parse_options(opts)
    b.log_unknown("/api/embeddings")
    return ParsedEmbed(
        model, EmbedRequest(model=model, inputs=[prompt] if prompt else [], keep_alive=keep_alive), keep_alive
    )


def embed_response(model: str, res: pb.EmbedResponse) -> dict[str, Any]:
    return {
        "model": model,
        "embeddings": [list(e.values) for e in res.embeddings],
        "total_duration": res.total_duration_ns,
        "load_duration": res.load_duration_ns,
        "prompt_eval_count": res.prompt_tokens,
    }


# ---------------------------------------------------------------- models


def details_json(d: Any) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": d.format or "mlx",
        "family": d.family,
        "families": list(d.families) or ([d.family] if d.family else None),
        "parameter_size": d.parameter_size,
        "quantization_level": d.quantization_level,
    }


def _time(dt: Optional[datetime]) -> str:
    return rfc3339(dt or datetime.now(timezone.utc))


def tags_response(res: pb.ListModelsResponse) -> dict[str, Any]:
    """Names carry a tag (``tiny-llama:latest``), as Ollama lists them (mlxgate.names)."""
    models = []
    for m in res.models:
        info = ModelInfo.from_pb(m)
        name = tagged(info.name)
        models.append(
            {
                "name": name,
                "model": name,
                "modified_at": _time(info.modified_at),
                "size": info.size_bytes,
                "digest": info.digest,
                "details": details_json(info.details),
                "backend": info.backend,
            }
        )
    return {"models": models}


def show_request(data: dict[str, Any]) -> str:
    b = Body(data)
    model = b.str("model", "") or b.str("name", "") or ""
    if not model:
        raise bad_request("model is required", param="model")
    b.ignore("verbose", "system", "template", "options")
    b.log_unknown("/api/show")
    return model


def _modelfile(show: ModelShow) -> str:
    lines = [
        "# Modelfile generated by mlxgate (informational: models are not built from Modelfiles here)",
        f"FROM {tagged(show.info.name)}",
    ]
    if show.chat_template:
        lines.append(f'TEMPLATE """{show.chat_template}"""')
    if show.context_length:
        lines.append(f"PARAMETER num_ctx {show.context_length}")
    if show.license:
        lines.append(f'LICENSE """{show.license}"""')
    return "\n".join(lines) + "\n"


def _model_info(show: ModelShow) -> dict[str, Any]:
    cfg = show.config or {}
    arch = show.info.details.family or str(cfg.get("model_type", "")) or "unknown"
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": show.info.name,
        "general.parameter_count": show.info.details.parameter_count,
    }
    keys = {
        "context_length": show.context_length or cfg.get("max_position_embeddings"),
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


def show_response(res: pb.ShowModelResponse) -> dict[str, Any]:
    show = ModelShow.from_pb(res)
    params = []
    if show.context_length:
        params.append(f"num_ctx {show.context_length}")
    return {
        "license": show.license,
        "modelfile": _modelfile(show),
        "parameters": "\n".join(params),
        "template": show.chat_template,
        "details": details_json(show.info.details),
        "model_info": _model_info(show),
        "capabilities": show.capabilities,
        "modified_at": _time(show.info.modified_at),
        "backend": show.info.backend,
    }


#: Ollama reports models kept loaded forever with an expiry centuries away.
_FOREVER = timedelta(days=365 * 290)


def ps_response(res: pb.ListRunningResponse) -> dict[str, Any]:
    models = []
    for m in res.models:
        r = RunningModel.from_pb(m)
        expires = r.expires_at or (datetime.now(timezone.utc) + _FOREVER)
        name = tagged(r.name)
        models.append(
            {
                "name": name,
                "model": name,
                "size": r.size_bytes,
                "digest": "",
                "details": details_json(r.details),
                "expires_at": rfc3339(expires),
                # Unified memory (Apple Silicon): the whole model counts as accelerator memory.
                "size_vram": r.size_bytes,
                "context_length": r.context_length,
                "backend": r.backend,
            }
        )
    return {"models": models}
