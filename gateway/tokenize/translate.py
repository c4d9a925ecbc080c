"""Tokenize and detokenize requests onto the contract, and the answers back (no I/O)."""

from __future__ import annotations

from typing import Any

from gateway.openai.translate import messages_pb
from gateway.parsing import parse
from gateway.times import duration
from gateway.tools import tools_pb
from mlxgate.dialects import tokenize as wire
from mlxgate.v1 import inference_pb2 as pb


def _keep_alive(req: Any, seconds: Any) -> Any:
    ka = duration(seconds)
    if ka is not None:
        req.keep_alive.CopyFrom(ka)
    return req


# ---------------------------------------------------------------- Ollama


def ollama_tokenize_request(data: dict[str, Any]) -> pb.TokenizeRequest:
    r = parse(wire.OllamaTokenizeRequest, data, "/api/tokenize")
    # Ollama's runner tokenizes without adding special tokens.
    return _keep_alive(pb.TokenizeRequest(model=r.model, text=r.content), r.keep_alive)


def ollama_tokenize_response(model: str, res: pb.TokenizeResponse) -> wire.OllamaTokenizeResponse:
    return {"model": model, "tokens": list(res.tokens)}


def ollama_detokenize_request(data: dict[str, Any]) -> pb.DetokenizeRequest:
    r = parse(wire.OllamaDetokenizeRequest, data, "/api/detokenize")
    return _keep_alive(pb.DetokenizeRequest(model=r.model, tokens=r.tokens), r.keep_alive)


def ollama_detokenize_response(model: str, res: pb.DetokenizeResponse) -> wire.OllamaDetokenizeResponse:
    return {"model": model, "content": res.text}


# ---------------------------------------------------------------- vLLM


def tokenize_request(data: dict[str, Any]) -> tuple[pb.TokenizeRequest, bool]:
    """The contract's request, and whether token strings were asked for."""
    r = parse(wire.tokenize_request_model(data), data, "/tokenize")
    if isinstance(r, wire.TokenizeChatRequest):
        req = pb.TokenizeRequest(model=r.model, chat=pb.ChatInput(messages=messages_pb(r.messages)),
                                 tools=tools_pb(r.tools), add_generation_prompt=r.add_generation_prompt is not False)
    else:
        req = pb.TokenizeRequest(model=r.model, text=r.prompt, add_special_tokens=r.add_special_tokens is not False)
    req.return_pieces = bool(r.return_token_strs)
    return req, req.return_pieces


def tokenize_response(res: pb.TokenizeResponse, pieces: bool) -> wire.TokenizeResponse:
    out: wire.TokenizeResponse = {"count": len(res.tokens), "max_model_len": res.context_length,
                                  "tokens": list(res.tokens)}
    if pieces:
        out["token_strs"] = list(res.pieces)
    return out


def detokenize_request(data: dict[str, Any]) -> pb.DetokenizeRequest:
    r = parse(wire.DetokenizeRequest, data, "/detokenize")
    return pb.DetokenizeRequest(model=r.model, tokens=r.tokens)


def detokenize_response(res: pb.DetokenizeResponse) -> wire.DetokenizeResponse:
    return {"prompt": res.text}
