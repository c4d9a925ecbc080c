"""The OpenAPI document matches the routes the app registers, both ways."""

from __future__ import annotations

import aiohttp

from gateway import openapi
from gateway.app import create_app, start_http
from mlxgate.config import ServerConfig

METHODS = {"get", "head", "post", "put", "delete", "patch", "options"}


def _registered() -> set[tuple[str, str]]:
    app = create_app(ServerConfig(), "127.0.0.1:1")  # the channel is lazy: nothing connects
    return {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.resource is not None}


def _documented(doc: dict) -> set[tuple[str, str]]:
    return {(m, path) for path, ops in doc["paths"].items() for m in ops if m in METHODS}


def _refs(node, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                out.add(v)
            else:
                _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)
    return out


def test_every_route_is_documented_and_vice_versa():
    doc = openapi.document()
    registered, documented = _registered(), _documented(doc)
    assert registered - documented == set(), "registered but not documented"
    assert documented - registered == set(), "documented but not registered"
    assert ("post", "/api/chat") in registered and ("get", "/v1/models/{model}") in registered


def test_document_is_openapi_31_and_refs_resolve():
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc, set()):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    for path, ops in doc["paths"].items():
        for m, op in ops.items():
            assert "responses" in op and op["summary"], (m, path)
            for param in op.get("parameters", []):
                assert param["in"] == "query" or "{" + param["name"] + "}" in path


def test_responses_api_is_documented():
    """The Responses routes: named SSE events without [DONE], the query string of input_items,
    404 for a stored object's id."""
    doc = openapi.document()
    create = doc["paths"]["/v1/responses"]["post"]
    events = create["responses"]["200"]["content"]["text/event-stream"]["schema"]["properties"]
    assert events["event"] == {"type": "string", "description": "the type of the event's data"}
    assert [b.get("const") for b in events["data"]["anyOf"]] == [None]  # no [DONE]
    listing = doc["paths"]["/v1/responses/{response_id}/input_items"]["get"]
    params = {p["name"]: p for p in listing["parameters"]}
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert params["order"]["schema"] == {"type": "string", "enum": ["asc", "desc"]}
    assert {"400", "404"} <= set(listing["responses"])
    for method in ("get", "delete"):
        assert "404" in doc["paths"]["/v1/responses/{response_id}"][method]["responses"]


def test_request_schemas_list_the_fields_the_translators_read():
    s = openapi.document()["components"]["schemas"]
    assert {"model", "prompt", "suffix", "system", "template", "raw", "images", "format", "options", "stream",
            "keep_alive", "think", "logprobs", "top_logprobs"} <= set(s["OllamaGenerateRequest"]["properties"])
    chat = s["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "tool_choice", "response_format", "max_completion_tokens", "logprobs"} <= set(chat)
    assert {"temperature", "top_p", "n", "seed", "stop", "stream_options"} <= set(chat)


async def test_openapi_json_is_served():
    http = await start_http(create_app(ServerConfig(), "127.0.0.1:1"))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(http.url + "/openapi.json") as r:
                assert r.status == 200
                doc = await r.json()
    finally:
        await http.stop()
    assert doc == openapi.document()
