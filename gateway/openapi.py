"""The OpenAPI 3.1 document of the HTTP front (GET /openapi.json), generated.

Paths come from the route tables (``gateway/*/routes.py``, ``model_list.py``, ``usage.py``: ``Route`` rows);
request bodies from the dialects' request models, answers from their response
``TypedDict``s (``mlxgate/dialects/``), all through pydantic's JSON schema
generation, so a field, an enum or a limit exists in one place and the
document cannot disagree with the code (tests/test_openapi_limits.py checks
that every bound it states is the one enforced).  Error bodies are the
dialect's; every status an operation can answer is listed.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

from aiohttp import web
from pydantic import TypeAdapter

from gateway.errors import dialect_of
from gateway.routing import Route
from gateway.routing import add_routes as _add
from gateway.state import BACKEND_HEADER, REQUEST_ID_HEADER
from mlxgate.dialects import anthropic, ollama, openai

S = dict[str, Any]
REF = "#/components/schemas/{model}"

_ERRORS = {"ollama": ollama.Error, "openai": openai.Error, "anthropic": anthropic.Error}

#: Why each status may be answered (the error table: docs/architecture.md, "Errors").
_STATUS_TEXT = {
    201: "created (a blob stored that was not there)",
    400: "invalid request: malformed JSON, a wrong type, a value outside the dialect's or the contract's bounds "
         "(the message names the field), or a prompt beyond the model's context",
    401: "missing or wrong API key (when keys are configured)",
    403: "refused Host or Origin, or (model management) a key that is not an admin key",
    404: "unknown model",
    408: "the request body did not arrive within http_body_timeout",
    413: "request body too large",
    429: "busy (the engine's queue is full) or rate limited upstream; see Retry-After",
    499: "the call was cancelled",
    500: "internal error (the message names the request id)",
    501: "not implemented",
    503: "unavailable: no backend could answer, the server is shutting down, or (Ollama dialect) busy",
    504: "deadline exceeded",
    529: "overloaded (Anthropic's overloaded_error): the engine is busy, no backend could answer, or the server "
         "is shutting down; see Retry-After",
}


def _statuses(r: Route, dialect: str) -> list[int]:
    out = {401, 403, 500, 503}
    if r.body is not None:
        out |= {400, 408, 413}
    if r.calls_service and not r.unsupported:
        out |= {400, 404, 413, 499, 501, 504}
        if dialect == "openai":
            out.add(429)
    if r.unsupported:
        out.add(501)
    if dialect == "anthropic":
        # Only the statuses Anthropic documents (gateway/errors.py: adapt).
        out = (out - {408, 429, 501, 503}) | {529}
    if r.query is not None:
        out.add(400)
    out.update(r.statuses)
    return sorted(out)


def _openapi_path(path: str) -> str:
    """aiohttp's "{model:.+}" is OpenAPI's "{model}"."""
    out, depth, skip = [], 0, False
    for ch in path:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            skip = False
        elif ch == ":" and depth:
            skip = True
            continue
        if not skip:
            out.append(ch)
    return "".join(out)


def _params(path: str, query: Any = None) -> list[S]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    out = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]
    if query is not None:
        schema = query.model_json_schema()
        for name, prop in schema.get("properties", {}).items():
            prop = dict(prop)
            description = prop.pop("description", None)
            prop.pop("title", None)
            prop.pop("default", None)
            # Optional fields are anyOf [type, null]; a query value is never null.
            branches = [b for b in prop.pop("anyOf", [prop]) if b.get("type") != "null"]
            param: S = {"name": name, "in": "query", "required": name in schema.get("required", ()),
                        "schema": {**prop, **branches[0]} if len(branches) == 1 else {**prop, "anyOf": branches}}
            if description:
                param["description"] = description
            out.append(param)
    return out


_REQUEST_ID: S = {
    "description": "the caller's X-Request-Id when sane (1-128 of [A-Za-z0-9._:-]), else a fresh one",
    "required": True,
    "schema": {"type": "string"},
}


def _headers(extra: Iterable[str] = ()) -> S:
    h: S = {REQUEST_ID_HEADER: _REQUEST_ID}
    for name in extra:
        if name == BACKEND_HEADER:
            h[name] = {"description": "the backend that answered", "schema": {"type": "string"}}
        elif name == "Retry-After":
            h[name] = {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
    return h


class _Schemas:
    """Every model and TypedDict the routes name, generated together so
    shared parts (``Tool``, ``Details``...) appear once under components."""

    def __init__(self, routes: list[Route]) -> None:
        wanted: dict[tuple[int, str], Any] = {}
        for r in routes:
            if r.body is not None:
                wanted[(id(r.body), "validation")] = r.body
            for t in (r.answer, r.stream_item):
                if t is not None:
                    wanted[(id(t), "serialization")] = t
        for err in _ERRORS.values():
            wanted[(id(err), "serialization")] = err
        inputs = [(key, key[1], TypeAdapter(t)) for key, t in wanted.items()]
        refs, defs = TypeAdapter.json_schemas(inputs, ref_template=REF)
        self.refs: dict[tuple[int, str], S] = {k[0]: v for k, v in refs.items()}  # type: ignore[misc]
        self.defs: S = defs.get("$defs", {})
        self._rename()

    def _rename(self) -> None:
        """pydantic qualifies clashing names with their module ("mlxgate__dialects__ollama__Error");
        the document calls them "OllamaError", "OpenAIError"."""
        prefixes = {"ollama": "Ollama", "openai": "OpenAI", "responses": "Responses", "anthropic": "Anthropic"}
        ollama_names = {n for n, v in vars(ollama).items() if isinstance(v, type) and v.__module__ == ollama.__name__}
        renames = {}
        for name in self.defs:
            if "__" in name:
                parts = name.split("__")
                renames[name] = prefixes.get(parts[-2], parts[-2].title()) + parts[-1]
            elif name in ollama_names:
                # Ollama's shapes are "Ollama..." throughout (OpenAI's keep their own names).
                renames[name] = "Ollama" + name
        if not renames:
            return
        old = "#/components/schemas/"

        def fix(node: Any) -> Any:
            if isinstance(node, dict):
                return {
                    k: (old + renames.get(v[len(old):], v[len(old):]) if k == "$ref" and isinstance(v, str) else fix(v))
                    for k, v in node.items()
                }
            if isinstance(node, list):
                return [fix(v) for v in node]
            return node

        self.defs = {renames.get(k, k): fix(v) for k, v in self.defs.items()}
        self.refs = {k: fix(v) for k, v in self.refs.items()}

    def body(self, t: Any) -> S:
        return self.refs[(id(t), "validation")]

    def answer(self, t: Any) -> S:
        return self.refs[(id(t), "serialization")]


def _operation(r: Route, s: _Schemas) -> S:
    dialect = dialect_of(r.path)
    head = r.method == "HEAD"
    error = {"application/json": {"schema": s.answer(_ERRORS[dialect])}}
    responses: S = {}
    if not r.unsupported:
        ok: S = {"description": "OK", "headers": _headers([BACKEND_HEADER] if r.calls_service else [])}
        content: S = {}
        if head:
            pass
        elif r.text is not None:
            content["text/plain"] = {"schema": {"type": "string", "const": r.text}}
        elif r.answer is not None:
            content["application/json"] = {"schema": s.answer(r.answer)}
        if r.stream is not None and not head:
            item = {"anyOf": [s.answer(r.stream_item), s.answer(_ERRORS[dialect])]}
            if r.stream == "ndjson":
                content["application/x-ndjson"] = {
                    "schema": {**item, "description": "each line is one of these; a stream that failed ends "
                                                      "with an error line"},
                }
            elif dialect == "anthropic":
                # Named events: event is the data's type; no [DONE] (message_stop ends the stream, an
                # error event a stream that failed).
                content["text/event-stream"] = {"schema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"enum": list(anthropic.EVENT_NAMES)},
                        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": item},
                    },
                }}
            elif r.event_names:
                # Named events (OpenAI's Responses API): event is the data's type; no [DONE].
                content["text/event-stream"] = {"schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {"anyOf": [
                            {"type": "string", "contentMediaType": "application/json",
                             "contentSchema": s.answer(r.stream_item)},
                        ]},
                        "event": {"type": "string", "description": "the type of the event's data"},
                    },
                }}
            else:
                # Each event (OpenAPI 3.1 reads an SSE schema as one event's): data is the JSON of
                # an item, or [DONE] at the end; a stream that failed ends with an error and no [DONE].
                content["text/event-stream"] = {"schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {"anyOf": [
                            {"const": "[DONE]"},
                            {"type": "string", "contentMediaType": "application/json", "contentSchema": item},
                        ]},
                        "event": {"const": "message"},
                    },
                }}
        if content:
            ok["content"] = content
        responses["200"] = ok
    for status in _statuses(r, dialect):
        extra = ["Retry-After"] if status in (429, 503, 529) else []
        resp: S = {"description": _STATUS_TEXT[status], "headers": _headers(extra)}
        if not head and status >= 400:
            resp["content"] = error
        responses[str(status)] = resp
    op: S = {
        "summary": r.summary,
        "operationId": f"{r.method.lower()}{_openapi_path(r.path).replace('/', '_').replace('{', '').replace('}', '')}",
        "tags": [dialect if r.path != "/openapi.json" else "meta"],
        "responses": responses,
    }
    if r.description:
        op["description"] = r.description
    if r.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": s.body(r.body)}}}
    params = _params(_openapi_path(r.path), r.query)
    if params:
        op["parameters"] = params
    return op


def all_routes() -> list[Route]:
    from gateway.anthropic.routes import ROUTES as ANTHROPIC
    from gateway.model_list import ROUTES as MODELS
    from gateway.ollama.routes import ROUTES as OLLAMA
    from gateway.openai.routes import ROUTES as OPENAI
    from gateway.rerank.routes import ROUTES as RERANK
    from gateway.responses.routes import ROUTES as RESPONSES
    from gateway.tokenize.routes import ROUTES as TOKENIZE
    from gateway.usage import ROUTES as USAGE

    return [*OLLAMA, *OPENAI, *MODELS, *RESPONSES, *ANTHROPIC, *RERANK, *TOKENIZE, *USAGE, *ROUTES]


@functools.lru_cache(maxsize=1)
def _document() -> bytes:
    from gateway.render import json_bytes

    return json_bytes(document())


def document() -> S:
    routes = all_routes()
    schemas = _Schemas(routes)
    paths: S = {}
    for r in routes:
        paths.setdefault(_openapi_path(r.path), {})[r.method.lower()] = _operation(r, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlxgate HTTP API",
            "version": "1",
            "description": "Ollama REST (/api/*), OpenAI REST (/v1/*) and Anthropic Messages (/v1/messages) in "
            "front of the mlxgate inference service. Every response carries X-Request-Id; answers from a backend "
            "carry x-mlxgate-backend. "
            "Bounds marked here are enforced: the dialects' own rules by the front, the contract's limits "
            "(mlxgate/limits.py) by the inference service.",
        },
        "tags": [
            {"name": "ollama", "description": 'Ollama dialect (errors: {"error": "..."})'},
            {"name": "openai", "description": 'OpenAI dialect (errors: {"error": {message,type,param,code}})'},
            {"name": "anthropic", "description": 'Anthropic Messages dialect (errors: {"type": "error", "error": '
                                                 '{type,message}})'},
            {"name": "meta"},
        ],
        "paths": paths,
        "components": {"schemas": schemas.defs},
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=_document(), content_type="application/json", charset="utf-8")


ROUTES: list[Route] = [
    Route("GET", "/openapi.json", openapi_json, "This document", answer=dict[str, Any], calls_service=False),
]


def add_routes(app: web.Application) -> None:
    _add(app, ROUTES)

