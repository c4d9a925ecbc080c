"""The OpenAPI 3.1 document of the HTTP front (served at GET /openapi.json).

One module, written by hand next to the translators it describes: request
bodies list the fields the server reads, responses the shapes it writes.
tests/test_http_openapi.py checks that every registered route is documented
and every documented operation is registered.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.ollama.routes import MODEL_MANAGEMENT_HELP
from gateway.ollama.translate import BOOL_OPTIONS, INT_OPTIONS, KNOWN_OPTIONS, OLLAMA_COMPAT_VERSION

S = dict[str, Any]


def _ref(name: str) -> S:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: S, required: tuple[str, ...] = (), extra: bool = True) -> S:
    d: S = {"type": "object", "properties": props}
    if required:
        d["required"] = list(required)
    if extra:
        # Lenient parsing: unknown fields are ignored.
        d["additionalProperties"] = True
    return d


STR: S = {"type": "string"}
INT: S = {"type": "integer"}
NUM: S = {"type": "number"}
BOOL: S = {"type": "boolean"}
ANYOBJ: S = {"type": "object", "additionalProperties": True}


def _arr(items: S) -> S:
    return {"type": "array", "items": items}


STR_OR_LIST: S = {"oneOf": [STR, _arr(STR)]}
DURATION: S = {
    "oneOf": [STR, NUM],
    "description": 'Go duration ("5m", "1h30m"), seconds as a number, 0 = unload after, negative = keep loaded',
}
THINK: S = {
    "oneOf": [BOOL, {"enum": ["low", "medium", "high"]}],
    "description": "true or a level (all mean true): reasoning in thinking; false: none; absent: the model's default",
}

_OPTION_TYPES: dict[str, S] = {
    "stop": STR_OR_LIST,
    **{k: INT for k in INT_OPTIONS},
    **{k: BOOL for k in BOOL_OPTIONS},
}

SCHEMAS: dict[str, S] = {
    # ------------------------------------------------------------ Ollama
    "OllamaError": _obj({"error": STR}, ("error",), extra=False),
    "OllamaOptions": {
        **_obj({k: _OPTION_TYPES.get(k, NUM) for k in sorted(KNOWN_OPTIONS)}),
        "description": "Mapped: temperature, top_p, top_k, min_p, seed, num_predict, stop, repeat_penalty, "
        "repeat_last_n, presence_penalty, frequency_penalty, num_ctx; the rest are accepted and ignored.",
    },
    "OllamaFormat": {"oneOf": [{"const": "json"}, ANYOBJ], "description": '"json" or a JSON schema'},
    "OllamaToolCall": _obj(
        {"id": STR, "function": _obj({"index": INT, "name": STR, "arguments": ANYOBJ}, ("name",))},
        ("function",),
    ),
    "Tool": _obj(
        {
            "type": {"const": "function"},
            "function": _obj({"name": STR, "description": STR, "parameters": ANYOBJ}, ("name",)),
        },
        ("function",),
    ),
    "OllamaMessage": _obj(
        {
            "role": {"enum": ["system", "user", "assistant", "tool"]},
            "content": STR,
            "images": _arr({"type": "string", "contentEncoding": "base64"}),
            "tool_calls": _arr(_ref("OllamaToolCall")),
            "tool_name": STR,
            "thinking": STR,
        },
        ("role",),
    ),
    "OllamaGenerateRequest": _obj(
        {
            "model": STR,
            "prompt": {**STR, "description": "empty or missing: load the model (keep_alive 0: unload)"},
            "suffix": STR,
            "system": STR,
            "template": {**STR, "description": "only with raw=true (ignored there); otherwise 400"},
            "raw": BOOL,
            "images": _arr({"type": "string", "contentEncoding": "base64"}),
            "format": _ref("OllamaFormat"),
            "options": _ref("OllamaOptions"),
            "stream": {**BOOL, "default": True},
            "keep_alive": DURATION,
            "think": THINK,
            "logprobs": BOOL,
            "top_logprobs": {**INT, "minimum": 0, "maximum": 20},
            "context": {**_arr(INT), "description": "deprecated; ignored"},
        },
        ("model",),
    ),
    "OllamaChatRequest": _obj(
        {
            "model": STR,
            "messages": {**_arr(_ref("OllamaMessage")), "description": "empty: load (keep_alive 0: unload)"},
            "tools": _arr(_ref("Tool")),
            "format": _ref("OllamaFormat"),
            "options": _ref("OllamaOptions"),
            "stream": {**BOOL, "default": True},
            "keep_alive": DURATION,
            "think": THINK,
            "logprobs": BOOL,
            "top_logprobs": {**INT, "minimum": 0, "maximum": 20},
        },
        ("model",),
    ),
    "OllamaLogprob": _obj({"token": STR, "logprob": NUM, "bytes": _arr(INT), "top_logprobs": _arr(ANYOBJ)}),
    "OllamaGenerateResponse": {
        **_obj(
            {
                "model": STR,
                "created_at": {"type": "string", "format": "date-time"},
                "response": STR,
                "thinking": {**STR, "description": "/api/generate: reasoning text, only when non-empty"},
                "message": _ref("OllamaMessage"),
                "done": BOOL,
                "done_reason": {"enum": ["stop", "length", "load", "unload"]},
                "total_duration": INT,
                "load_duration": INT,
                "prompt_eval_count": INT,
                "prompt_eval_duration": INT,
                "eval_count": INT,
                "eval_duration": INT,
                "logprobs": _arr(_ref("OllamaLogprob")),
                "backend": {**STR, "description": "mlxgate extension, final object only"},
                "error": {**STR, "description": "last line of a stream that failed"},
            },
            ("model", "created_at", "done"),
        ),
        "description": "One object (stream=false) or one NDJSON line per chunk; /api/generate has "
        "'response', /api/chat has 'message'. Durations in nanoseconds.",
    },
    "OllamaEmbedRequest": _obj(
        {
            "model": STR,
            "input": STR_OR_LIST,
            "truncate": {**BOOL, "default": True},
            "dimensions": INT,
            "keep_alive": DURATION,
            "options": _ref("OllamaOptions"),
        },
        ("model",),
    ),
    "OllamaEmbedResponse": _obj(
        {
            "model": STR,
            "embeddings": _arr(_arr(NUM)),
            "total_duration": INT,
            "load_duration": INT,
            "prompt_eval_count": INT,
        }
    ),
    "OllamaEmbeddingsRequest": _obj(
        {"model": STR, "prompt": STR, "keep_alive": DURATION, "options": _ref("OllamaOptions")}, ("model",)
    ),
    "OllamaEmbeddingsResponse": _obj({"embedding": _arr(NUM)}),
    "OllamaDetails": _obj(
        {
            "parent_model": STR,
            "format": STR,
            "family": STR,
            "families": {"oneOf": [_arr(STR), {"type": "null"}]},
            "parameter_size": STR,
            "quantization_level": STR,
        }
    ),
    "OllamaTagsResponse": _obj(
        {
            "models": _arr(
                _obj(
                    {
                        "name": STR,
                        "model": STR,
                        "modified_at": {"type": "string", "format": "date-time"},
                        "size": INT,
                        "digest": STR,
                        "details": _ref("OllamaDetails"),
                        "backend": STR,
                    }
                )
            )
        }
    ),
    "OllamaShowRequest": _obj({"model": STR, "name": {**STR, "deprecated": True}, "verbose": BOOL}),
    "OllamaShowResponse": _obj(
        {
            "license": STR,
            "modelfile": STR,
            "parameters": STR,
            "template": {**STR, "description": "the model's chat template (Jinja)"},
            "details": _ref("OllamaDetails"),
            "model_info": ANYOBJ,
            "capabilities": _arr(STR),
            "modified_at": {"type": "string", "format": "date-time"},
            "backend": STR,
        }
    ),
    "OllamaPsResponse": _obj(
        {
            "models": _arr(
                _obj(
                    {
                        "name": STR,
                        "model": STR,
                        "size": INT,
                        "digest": STR,
                        "details": _ref("OllamaDetails"),
                        "expires_at": {"type": "string", "format": "date-time"},
                        "size_vram": INT,
                        "context_length": INT,
                        "backend": STR,
                    }
                )
            )
        }
    ),
    # ------------------------------------------------------------ OpenAI
    "OpenAIError": _obj(
        {
            "error": _obj(
                {
                    "message": STR,
                    "type": STR,
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
                ("message", "type"),
            )
        },
        ("error",),
    ),
    "ContentPart": {
        "oneOf": [
            _obj({"type": {"const": "text"}, "text": STR}, ("type", "text")),
            _obj(
                {
                    "type": {"const": "image_url"},
                    "image_url": _obj({"url": {**STR, "description": "data: URL, base64"}, "detail": STR}),
                },
                ("type", "image_url"),
            ),
        ]
    },
    "ChatMessage": _obj(
        {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"oneOf": [STR, _arr(_ref("ContentPart")), {"type": "null"}]},
            "name": STR,
            "tool_calls": _arr(
                _obj(
                    {
                        "id": STR,
                        "type": {"const": "function"},
                        "function": _obj({"name": STR, "arguments": {**STR, "description": "JSON text"}}),
                    }
                )
            ),
            "tool_call_id": STR,
            "reasoning_content": {
                **STR,
                "description": "assistant: reasoning text beside content (DeepSeek/vLLM convention), only when "
                "non-empty; accepted back in history",
            },
        },
        ("role",),
    ),
    "SamplingFields": _obj(
        {
            "temperature": {**NUM, "minimum": 0, "maximum": 2},
            "top_p": {**NUM, "minimum": 0, "maximum": 1},
            "presence_penalty": {**NUM, "minimum": -2, "maximum": 2},
            "frequency_penalty": {**NUM, "minimum": -2, "maximum": 2},
            "seed": INT,
            "stop": STR_OR_LIST,
            "n": {**INT, "minimum": 1, "maximum": 128},
            "stream": BOOL,
            "stream_options": _obj({"include_usage": BOOL}),
            "top_k": {**INT, "description": "extension"},
            "min_p": {**NUM, "description": "extension"},
            "repeat_penalty": {**NUM, "description": "extension"},
            "user": {**STR, "description": "ignored"},
        }
    ),
    "ChatCompletionRequest": {
        "allOf": [
            _ref("SamplingFields"),
            _obj(
                {
                    "model": STR,
                    "messages": _arr(_ref("ChatMessage")),
                    "tools": _arr(_ref("Tool")),
                    "tool_choice": {
                        "oneOf": [{"enum": ["none", "auto", "required"]}, ANYOBJ],
                        "description": "none drops tools; auto offers them; required forces one call to one of them, "
                        "a named function keeps only it and forces a call to it (MLX engine, json_tools models; "
                        "400 otherwise or with a JSON response_format)",
                    },
                    "response_format": _obj(
                        {"type": {"enum": ["text", "json_object", "json_schema"]}, "json_schema": ANYOBJ},
                        ("type",),
                    ),
                    "max_tokens": INT,
                    "max_completion_tokens": {**INT, "description": "wins over max_tokens"},
                    "logprobs": BOOL,
                    "top_logprobs": {**INT, "minimum": 0, "maximum": 20},
                    "reasoning_effort": {
                        "enum": ["none", "minimal", "low", "medium", "high"],
                        "description": "none: no thinking; any other level: thinking (the level is not "
                        "honoured); absent: the model's default",
                    },
                },
                ("model", "messages"),
            ),
        ]
    },
    "Usage": _obj(
        {
            "prompt_tokens": INT,
            "completion_tokens": INT,
            "total_tokens": INT,
            "prompt_tokens_details": _obj({"cached_tokens": INT}),
        }
    ),
    "ChatCompletion": _obj(
        {
            "id": STR,
            "object": {"enum": ["chat.completion", "chat.completion.chunk"]},
            "created": INT,
            "model": STR,
            "system_fingerprint": STR,
            "choices": _arr(
                _obj(
                    {
                        "index": INT,
                        "message": _ref("ChatMessage"),
                        "delta": _ref("ChatMessage"),
                        "finish_reason": {"enum": ["stop", "length", "tool_calls", None]},
                        "logprobs": {"oneOf": [ANYOBJ, {"type": "null"}]},
                    }
                )
            ),
            "usage": {"oneOf": [_ref("Usage"), {"type": "null"}]},
            "backend": {**STR, "description": "mlxgate extension, last chunk of a stream"},
        }
    ),
    "CompletionRequest": {
        "allOf": [
            _ref("SamplingFields"),
            _obj(
                {
                    "model": STR,
                    "prompt": {**STR_OR_LIST, "description": "text only; token arrays are 400"},
                    "suffix": STR,
                    "max_tokens": INT,
                    "logprobs": {**INT, "minimum": 0, "maximum": 5},
                    "echo": {**BOOL, "description": "true is 400 (unsupported)"},
                    "best_of": {**INT, "description": "only equal to n"},
                },
                ("model", "prompt"),
            ),
        ]
    },
    "Completion": _obj(
        {
            "id": STR,
            "object": {"const": "text_completion"},
            "created": INT,
            "model": STR,
            "system_fingerprint": STR,
            "choices": _arr(
                _obj({"index": INT, "text": STR, "finish_reason": {"enum": ["stop", "length", None]}, "logprobs": {}})
            ),
            "usage": {"oneOf": [_ref("Usage"), {"type": "null"}]},
        }
    ),
    "EmbeddingsRequest": _obj(
        {
            "model": STR,
            "input": {
                "oneOf": [
                    STR,
                    {"type": "array", "items": STR, "minItems": 1},
                    {"type": "array", "items": {**INT, "minimum": 0}, "minItems": 1},
                    {"type": "array", "items": {"type": "array", "items": {**INT, "minimum": 0}, "minItems": 1},
                     "minItems": 1},
                ],
                "description": "text, or token ids of the model's own tokenizer (MLX models only; 400 for a "
                "model only an upstream Ollama or a cloud API serves)",
            },
            "encoding_format": {"enum": ["float", "base64"], "default": "float"},
            "dimensions": {**INT, "minimum": 1},
            "user": STR,
        },
        ("model", "input"),
    ),
    "EmbeddingsResponse": _obj(
        {
            "object": {"const": "list"},
            "data": _arr(
                _obj(
                    {
                        "object": {"const": "embedding"},
                        "index": INT,
                        "embedding": {"oneOf": [_arr(NUM), {**STR, "description": "base64 little-endian float32"}]},
                    }
                )
            ),
            "model": STR,
            "usage": _obj({"prompt_tokens": INT, "total_tokens": INT}),
        }
    ),
    "Model": _obj({"id": STR, "object": {"const": "model"}, "created": INT, "owned_by": STR}),
    "ModelList": _obj({"object": {"const": "list"}, "data": _arr(_ref("Model"))}),
}


def _json(schema: S) -> S:
    return {"application/json": {"schema": schema}}


def _body(name: str) -> S:
    return {"required": True, "content": _json(_ref(name))}


def _errors(dialect: str) -> S:
    err = _ref("OpenAIError" if dialect == "openai" else "OllamaError")
    out: S = {}
    for code, text in (
        ("400", "invalid request (malformed JSON, wrong types, missing fields)"),
        ("404", "unknown model or route"),
        ("413", "request body too large"),
        ("429", "rate limited / busy (OpenAI dialect)"),
        ("500", "internal error"),
        ("501", "not implemented"),
        ("503", "unavailable (Ollama dialect: also busy)"),
        ("504", "deadline exceeded"),
    ):
        out[code] = {"description": text, "content": _json(err)}
    return out


def _op(summary: str, dialect: str, ok: S, body: str | None = None, tag: str | None = None) -> S:
    op: S = {"summary": summary, "tags": [tag or dialect], "responses": {"200": ok, **_errors(dialect)}}
    if body:
        op["requestBody"] = _body(body)
    return op


def _ok(schema_name: str, *, stream: str | None = None, desc: str = "OK") -> S:
    content = _json(_ref(schema_name))
    if stream == "ndjson":
        content["application/x-ndjson"] = {"schema": _ref(schema_name)}
    elif stream == "sse":
        content["text/event-stream"] = {
            "schema": {**STR, "description": "data: <chunk JSON>\\n\\n ... data: [DONE]\\n\\n"}
        }
    return {"description": desc, "content": content}


_TEXT_OK: S = {"description": "OK", "content": {"text/plain": {"schema": {"const": "Ollama is running"}}}}
_UNSUPPORTED: S = {"description": "never: always 501"}


def _unsupported(summary: str) -> S:
    op = _op(summary, "ollama", _UNSUPPORTED)
    op["description"] = MODEL_MANAGEMENT_HELP
    return op


def _paths() -> S:
    version_ok = {
        "description": f"Ollama-compatible version ({OLLAMA_COMPAT_VERSION})",
        "content": _json(_obj({"version": STR})),
    }
    digest = [{"name": "digest", "in": "path", "required": True, "schema": STR}]
    model_param = [{"name": "model", "in": "path", "required": True, "schema": STR}]
    return {
        "/": {
            "get": _op("Health check", "ollama", _TEXT_OK),
            "head": _op("Health check", "ollama", {"description": "OK"}),
        },
        "/api/version": {
            "get": _op("Server version", "ollama", version_ok),
            "head": _op("Server version", "ollama", {"description": "OK"}),
        },
        "/api/generate": {
            "post": _op(
                "Generate a completion",
                "ollama",
                _ok("OllamaGenerateResponse", stream="ndjson"),
                "OllamaGenerateRequest",
            )
        },
        "/api/chat": {
            "post": _op(
                "Generate a chat completion",
                "ollama",
                _ok("OllamaGenerateResponse", stream="ndjson"),
                "OllamaChatRequest",
            )
        },
        "/api/embed": {"post": _op("Generate embeddings", "ollama", _ok("OllamaEmbedResponse"), "OllamaEmbedRequest")},
        "/api/embeddings": {
            "post": _op(
                "Generate an embedding (legacy)",
                "ollama",
                _ok("OllamaEmbeddingsResponse"),
                "OllamaEmbeddingsRequest",
            )
        },
        "/api/tags": {
            "get": _op("List models", "ollama", _ok("OllamaTagsResponse")),
            "head": _op("List models", "ollama", {"description": "OK"}),
        },
        "/api/show": {"post": _op("Show model information", "ollama", _ok("OllamaShowResponse"), "OllamaShowRequest")},
        "/api/ps": {"get": _op("List running models", "ollama", _ok("OllamaPsResponse"))},
        "/api/pull": {"post": _unsupported("Pull a model (unsupported)")},
        "/api/push": {"post": _unsupported("Push a model (unsupported)")},
        "/api/create": {"post": _unsupported("Create a model (unsupported)")},
        "/api/copy": {"post": _unsupported("Copy a model (unsupported)")},
        "/api/delete": {"delete": _unsupported("Delete a model (unsupported)")},
        "/api/blobs/{digest}": {
            "head": {**_unsupported("Check a blob (unsupported)"), "parameters": digest},
            "post": {**_unsupported("Push a blob (unsupported)"), "parameters": digest},
        },
        "/v1/chat/completions": {
            "post": _op(
                "Create a chat completion", "openai", _ok("ChatCompletion", stream="sse"), "ChatCompletionRequest"
            )
        },
        "/v1/completions": {
            "post": _op("Create a completion", "openai", _ok("Completion", stream="sse"), "CompletionRequest")
        },
        "/v1/embeddings": {"post": _op("Create embeddings", "openai", _ok("EmbeddingsResponse"), "EmbeddingsRequest")},
        "/v1/models": {"get": _op("List models", "openai", _ok("ModelList"))},
        "/v1/models/{model}": {"get": {**_op("Retrieve a model", "openai", _ok("Model")), "parameters": model_param}},
        "/openapi.json": {
            "get": _op("This document", "ollama", {"description": "OpenAPI 3.1", "content": _json(ANYOBJ)}, tag="meta")
        },
    }


def document() -> S:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlxgate HTTP API",
            "version": "1",
            "description": "Ollama REST (/api/*) and OpenAI REST (/v1/*) in front of the mlxgate inference "
            "service. Every response carries X-Request-Id; non-streaming generations carry "
            "x-mlxgate-backend.",
        },
        "tags": [
            {"name": "ollama", "description": 'Ollama dialect (errors: {"error": "..."})'},
            {"name": "openai", "description": 'OpenAI dialect (errors: {"error": {message,type,param,code}})'},
            {"name": "meta"},
        ],
        "paths": _paths(),
        "components": {"schemas": SCHEMAS},
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document())


ROUTES: list[tuple[str, str, Any]] = [("GET", "/openapi.json", openapi_json)]


def add_routes(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
