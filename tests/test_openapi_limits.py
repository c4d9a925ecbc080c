"""The document's limits are the enforced ones.

Walks the generated /openapi.json: for every bound it states on a request
body (minimum, maximum, exclusiveMinimum, minLength, maxLength, minItems,
maxItems, on any field at any depth), a request one past the bound gets 400,
and a request at the bound does not, against the real stack (front -> gRPC
service -> MLX engine on the generated model).  "One past" is ±1 for
integers, lengths and counts, and ±0.001 for other numbers (the contract's
float fields are float32: a smaller step could round back onto the bound).

At the bound a request may still be refused for a reason that is the test
model's, never the bound's, and only these, each recognised by its message:
its 2,048-token context ("context length exceeded": 4,096 messages or 256
tools do not fit, and OpenAI never truncates), no vision ("does not support
images"), its embedding size ("exceed", dimensions at int32's maximum), and
OpenAI's best_of, which must equal n.  Generations are streamed and the
connection closed as soon as the status is known, so a bound such as
max_tokens = 2**31 - 1 costs one token, not a context-full of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import aiohttp
import pytest

from tests.images import b64, png
from tests.stack import MODEL

pytestmark = pytest.mark.timeout(240)

#: A minimal valid body per operation (streams where the operation streams).
BASE: dict[str, dict[str, Any]] = {
    "/api/generate": {"model": MODEL, "prompt": "hi", "options": {"num_predict": 1}},
    "/api/chat": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 1}},
    "/api/embed": {"model": MODEL, "input": "hi"},
    "/api/embeddings": {"model": MODEL, "prompt": "hi"},
    "/api/show": {"model": MODEL},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                             "stream": True, "logprobs": True},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1, "stream": True},
    "/v1/embeddings": {"model": MODEL, "input": "hi"},
    "/v1/responses": {"model": MODEL, "input": [{"role": "user", "content": "hi"}], "max_output_tokens": 1,
                      "stream": True, "store": False},
    "/v1/messages": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                     "stream": True},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/rerank": {"model": MODEL, "query": "hi", "documents": ["hi"]},
    "/api/tokenize": {"model": MODEL, "content": "hi"},
    "/api/detokenize": {"model": MODEL, "tokens": [1]},
    "/tokenize": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    "/detokenize": {"model": MODEL, "tokens": [1]},
}

#: What a base64 field holds (images: a real one, so the image checks pass).
PNG_B64 = b64(png())

#: Refusals at a bound that are the test model's (or the dialect's other rules), not the bound's.
NOT_THE_BOUND = ("context length exceeded", "does not take images", "exceed", "best_of", "vocabulary")

KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength", "minItems", "maxItems")
#: The types a keyword constrains (beside an anyOf it belongs to the matching branch: ``_carry``).
_APPLIES = {
    "minimum": ("integer", "number"), "maximum": ("integer", "number"), "exclusiveMinimum": ("integer", "number"),
    "minLength": ("string",), "maxLength": ("string",), "minItems": ("array",), "maxItems": ("array",),
}


@dataclass
class Bound:
    route: str
    path: tuple[Any, ...]  # keys, with "[]" for "the first item of this array"
    keyword: str
    value: Any
    schema: dict[str, Any]  # the node the bound is on (for the item type of an array)

    def __str__(self) -> str:
        dotted = ".".join(str(p) for p in self.path).replace(".[]", "[]")
        return f"{self.route} {dotted} {self.keyword}={self.value}"


class Doc:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = self.doc["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(self, route: str, node: dict[str, Any], path: tuple, seen: frozenset) -> Iterator[Bound]:
        ref = node.get("$ref")
        if ref in seen:
            return
        seen = seen | {ref} if ref else seen
        node = self.resolve(node)
        for kw in KEYWORDS:
            if kw in node and node.get("type") in _APPLIES[kw]:
                yield Bound(route, path, kw, node[kw], node)
        for branch in (*node.get("anyOf", ()), *node.get("oneOf", ())):
            yield from self.walk(route, {**branch, **_carry(node, branch)}, path, seen)
        for name, prop in node.get("properties", {}).items():
            yield from self.walk(route, prop, (*path, name), seen)
        if "items" in node:
            yield from self.walk(route, node["items"], (*path, "[]"), seen)

    def example(self, node: dict[str, Any]) -> Any:
        """A minimal valid instance of a schema."""
        node = self.resolve(node)
        if "examples" in node:
            return node["examples"][0]
        for union in ("anyOf", "oneOf"):
            if union in node:
                return self.example(next(b for b in node[union] if b.get("type") != "null"))
        if "const" in node:
            return node["const"]
        if "enum" in node:
            return node["enum"][0]
        kind = node.get("type")
        if kind == "object" or "properties" in node:
            return {k: self.example(node["properties"][k]) for k in node.get("required", ())}
        if kind == "array":
            return [self.example(node["items"])] * node.get("minItems", 0)
        if kind == "string":
            return PNG_B64 if node.get("contentEncoding") == "base64" else "x" * max(1, node.get("minLength", 0))
        if kind in ("integer", "number"):
            return node.get("minimum", 0)
        if kind == "boolean":
            return False
        return None


def _carry(parent: dict[str, Any], branch: dict[str, Any]) -> dict[str, Any]:
    """A bound stated beside an anyOf (stop's maxItems) belongs to the matching branch."""
    out = {}
    if branch.get("type") == "array":
        out.update({k: parent[k] for k in ("maxItems", "minItems") if k in parent and k not in branch})
    if branch.get("type") in ("integer", "number"):
        out.update({k: parent[k] for k in ("minimum", "maximum", "exclusiveMinimum") if k in parent
                    and k not in branch})
    if branch.get("type") == "string":
        out.update({k: parent[k] for k in ("minLength", "maxLength") if k in parent and k not in branch})
    return out


def _values(b: Bound, doc: Doc, current: Any) -> tuple[Any, Any]:
    """(at the bound, one past it)."""
    v = b.value
    integer = b.schema.get("type") == "integer"
    step = 1 if integer else 0.001
    if b.keyword == "minimum":
        return v, v - step
    if b.keyword == "maximum":
        return v, v + step
    if b.keyword == "exclusiveMinimum":
        return v + step, v
    if b.keyword in ("minLength", "maxLength"):
        return "x" * v, "x" * (v - 1 if b.keyword == "minLength" else v + 1)
    item = current[0] if isinstance(current, list) and current else doc.example(b.schema["items"])
    n = v - 1 if b.keyword == "minItems" else v + 1
    return [copy.deepcopy(item) for _ in range(v)], [copy.deepcopy(item) for _ in range(n)]


def _place(body: dict[str, Any], b: Bound, doc: Doc, root: dict[str, Any]) -> tuple[Any, Any]:
    """Walk ``body`` to the bound's parent (creating minimal parts on the way); return (parent, key)."""
    node: Any = body
    schema = root
    for i, part in enumerate(b.path[:-1]):
        if part == "[]":
            items = _array(doc, schema, nested=b.path[i + 1] == "[]")["items"]
            # Of a union of objects told apart by "type" (Responses' input items), the one with the field.
            branch = _object_with(doc, items, b.path[i + 1])
            kind = branch.get("properties", {}).get("type", {}).get("const") if branch else None
            if not node or not isinstance(node[0], type(doc.example(items))) or (
                kind is not None and isinstance(node[0], dict) and node[0].get("type") != kind
            ):
                node[:] = [doc.example(branch or items)]
            node, schema = node[0], items
            continue
        prop = _props(doc, schema, part)[part]
        if not isinstance(node.get(part), (dict, list)) or (
            b.path[i + 1] == "[]" and b.path[i + 2 : i + 3] == ("[]",) and not isinstance(node[part][0], list)
        ):
            if b.path[i + 1] == "[]":
                node[part] = [doc.example(_array(doc, prop, nested=b.path[i + 2 : i + 3] == ("[]",))["items"])]
            else:
                first = next(x for x in _branches(doc, prop) if "properties" in x)
                node[part] = doc.example(_object_with(doc, prop, b.path[i + 1]) or first)
        node, schema = node[part], prop
    return node, b.path[-1]


def _branches(doc: Doc, schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    schema = doc.resolve(schema)
    yield schema
    for branch in (*schema.get("anyOf", ()), *schema.get("oneOf", ())):
        yield from _branches(doc, branch)


def _props(doc: Doc, schema: dict[str, Any], key: Any = None) -> dict[str, Any]:
    """The properties of the schema's first object branch (that has ``key``, when given)."""
    return next(b["properties"] for b in _branches(doc, schema) if "properties" in b
                and (key is None or key in b["properties"]))


def _object_with(doc: Doc, schema: dict[str, Any], key: Any) -> dict[str, Any]:
    """The schema's first object branch with the property ``key`` ({} if none)."""
    return next((b for b in _branches(doc, schema) if key in b.get("properties", {})), {})


def _array(doc: Doc, schema: dict[str, Any], nested: bool = False) -> dict[str, Any]:
    """The schema's array branch; with ``nested``, one whose items are arrays
    themselves (a union may offer several arrays: embeddings' texts and token ids)."""
    arrays = [b for b in _branches(doc, schema) if b.get("type") == "array"]
    if nested:
        return next(b for b in arrays if doc.resolve(b["items"]).get("type") == "array")
    return arrays[0]


def _adjust(route: str, b: Bound, body: dict[str, Any], value: Any) -> None:
    """Keep the rest of the request consistent with the value under test."""
    if route == "/api/show" and b.path == ("name",):
        body.pop("model", None)  # "model" wins over the deprecated "name"
    if route == "/v1/chat/completions" and b.path[:1] == ("tool_choice",) and isinstance(value, str):
        body["tools"] = [{"type": "function", "function": {"name": value}}]
    if route == "/v1/responses" and b.path[:1] == ("tool_choice",) and isinstance(value, str):
        body["tools"] = [{"type": "function", "name": value}]
    if route.startswith("/v1/messages"):
        if b.path[:1] == ("tool_choice",) and isinstance(value, str):
            body["tools"] = [{"name": value, "input_schema": {"type": "object"}}]
        messages = body.get("messages") or []
        for m in messages:
            blocks = m.get("content") if isinstance(m.get("content"), list) else []
            if any(isinstance(c, dict) and c.get("type") == "tool_use" for c in blocks):
                m["role"] = "assistant"  # tool_use blocks are the assistant's
        if messages and messages[-1].get("role") == "assistant":
            messages.append({"role": "user", "content": "go on"})
    if route == "/v1/completions" and b.path == ("best_of",):
        body["n"] = min(value, 128) if isinstance(value, int) and value >= 1 else 1


async def _status(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str]:
    async with session.post(url, json=body) as r:
        if r.status < 400:
            return r.status, ""  # leaving the block closes the stream: the generation is cancelled
        return r.status, await r.text()


def _bounds(doc: Doc) -> list[Bound]:
    out = []
    for route in BASE:
        op = doc.doc["paths"][route]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        out.extend(doc.walk(route, schema, (), frozenset()))
    return out


async def test_every_documented_request_bound_is_the_enforced_one(stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.base + "/openapi.json") as r:
            doc = Doc(await r.json())
        bounds = _bounds(doc)
        assert len(bounds) > 60, [str(b) for b in bounds]
        # The contract's limits are among them (documented by the dialects, enforced by the service).
        stated = {str(b) for b in bounds}
        assert "/api/chat options.stop[] maxLength=1024" in stated and "/v1/chat/completions stop maxItems=64" in stated
        assert "/api/chat messages maxItems=4096" in stated and "/v1/chat/completions top_logprobs maximum=20" in stated
        failures = []
        for b in bounds:
            root = doc.doc["paths"][b.route]["post"]["requestBody"]["content"]["application/json"]["schema"]
            results = []
            for which in (0, 1):
                body = copy.deepcopy(BASE[b.route])
                parent, key = _place(body, b, doc, root)
                current = parent[0] if key == "[]" else parent.get(key) if isinstance(parent, dict) else None
                value = _values(b, doc, current)[which]
                if key == "[]":
                    parent[0] = value
                else:
                    parent[key] = value
                _adjust(b.route, b, body, value)
                results.append(await _status(session, stack.base + b.route, body))
            (at, at_text), (past, past_text) = results
            if past != 400:
                failures.append(f"{b}: one past the bound answered {past} {past_text[:200]}")
            if at == 400 and not any(reason in at_text for reason in NOT_THE_BOUND):
                failures.append(f"{b}: at the bound answered 400 {at_text[:300]}")
            elif at >= 500:
                failures.append(f"{b}: at the bound answered {at} {at_text[:300]}")
        assert not failures, "\n".join(failures)


def test_bounds_are_found_in_nested_and_union_fields() -> None:
    """The walk itself: a bound on an array inside an anyOf, inside an item, is found."""
    from gateway import openapi

    doc = Doc(openapi.document())
    stated = {str(b) for b in _bounds(doc)}
    for expected in (
        "/v1/chat/completions messages[].tool_calls maxItems=256",
        "/v1/chat/completions tools[].function.name maxLength=256",
        "/api/chat options.top_k minimum=0",
        "/api/chat options.repeat_penalty exclusiveMinimum=0",
        "/v1/completions prompt maxItems=128",
        "/api/embed input maxItems=2048",
        "/v1/chat/completions n maximum=128",
        "/v1/responses input maxItems=4096",
        "/v1/responses input[].name maxLength=256",
        "/v1/responses tools[].name maxLength=256",
        "/v1/responses tool_choice.tools[].name maxLength=256",
        "/v1/responses max_output_tokens minimum=1",
    ):
        assert expected in stated, expected

