"""Property-based checking of the HTTP API from its own OpenAPI document.

schemathesis generates requests for every operation of the generated
/openapi.json and sends them to the real stack (front -> gRPC service -> MLX
engine on the generated model); every answer must be no server error, have a
documented status, content type, headers and body (checks below), and the
items of NDJSON and SSE streams must match their item schemas.  Operations
with a body are also sent bodies that break the document (schemathesis's
negative mode): schemathesis's ``negative_data_rejection`` check holds them
to a refusal, 400 (the body breaks the dialect's model), 404 (an unknown
model) or 413 (too large) -- never a 200, never a 500.  Deliberate
exceptions, named: push answers 501 to every body by design (README,
"Deviations from Ollama"), and create, copy, delete and blobs on the
session's service (which manages no models) a documented 4xx or 501, so for
them the check is that they do, in the documented shape; Ollama's load and
unload forms (a generate, chat or embed body with no prompt, messages or
input) read only ``model`` and ``keep_alive``, as in Ollama, and
``/api/show`` reads its deprecated ``name`` only without ``model``
(``LOAD_FORMS``, ``_unread_parts``): a break elsewhere in such a body is not
read, so not refused; a negative body whose only break is in a field the
cost caps below rewrite is sent as generated (the caps would mend it), and
schemathesis's own rules skip a mutation that serialises to a valid body (a
float that is an integer, ...).

Cost.  The server bounds every request (the contract's limits, the model's
2,048-token context), but a generated ``n`` of 128 with ``max_tokens`` 2**31
is still 128 context-fulls of tokens: the test caps ``n`` at 2 and token
counts at 8 (``max_output_tokens`` of the Responses API too), and sends the
generated body's ``model`` as the test model so that generations happen at
all (unknown models are covered by the error tests).
Examples.  MLXGATE_SCHEMATHESIS_EXAMPLES (default 100) positive examples
per operation, and a third as many negative ones where it takes a body;
a quarter of both (25 and 8) where the body is small, at most
``SMALL_BODY`` schema nodes (show, pull, copy, delete, the
three rerank routes, /api/tokenize and both detokenize routes: 25 examples
of a handful of fields try each field's types, bounds and absence many
times over), or is parsed by the models of an operation that gets the
full count (``SHARED_PARTS``: count_tokens's body is the Messages body's
fields, parsed by the same models; /tokenize's messages and tools are chat
completions'), except where the server refuses most of what is drawn
(``MOSTLY_REFUSED``: /v1/embeddings).  Generating a large body, more than answering it, is the
cost: at 20 examples count_tokens and /tokenize were over a third of the
run.  Every operation is still sent valid and invalid bodies under all the
checks, negative_data_rejection included.  MLXGATE_SCHEMATHESIS_ONLY (an
operation's label, "POST /api/chat") runs one operation.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections import Counter
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import CheckConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.stack import MODEL

pytestmark = pytest.mark.timeout(600)

EXAMPLES = int(os.environ.get("MLXGATE_SCHEMATHESIS_EXAMPLES", "100"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
#: The last event of a Responses stream (named events, no [DONE]).
RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
#: What a body that breaks the document may get (negative_data_rejection).
REFUSALS = ["400", "404", "413"]
#: A request body of at most this many schema nodes (properties, types, $refs) is small: a quarter of EXAMPLES.
SMALL_BODY = 30
#: Operations whose body is parsed by models the operation named here explores with all of EXAMPLES.
SHARED_PARTS = {
    "POST /v1/messages/count_tokens": "POST /v1/messages",
    "POST /tokenize": "POST /v1/chat/completions",
}
#: Small bodies whose generated examples the server mostly refuses by design (empty strings, token
#: ids beyond the generated model's small vocabulary): with a quarter of EXAMPLES, a run once drew
#: not one it could answer (33 x 400), so they keep all of EXAMPLES and the check that some were answered holds.
MOSTLY_REFUSED = {"POST /v1/embeddings"}
#: Ollama routes whose body without this field is a load (or unload): only model and keep_alive are read.
LOAD_FORMS = {"/api/generate": "prompt", "/api/chat": "messages", "/api/embed": "input", "/api/embeddings": "prompt"}


def _unread_parts(path: str, body: Any) -> bool:
    """Whether the server leaves parts of this body unread on purpose (see the
    module docstring): Ollama's load/unload forms, /api/show's ``name`` beside ``model``."""
    if not isinstance(body, dict):
        return False
    if path in LOAD_FORMS:
        return not body.get(LOAD_FORMS[path])
    return path == "/api/show" and body.get("model") is not None and "name" in body


#: Push: 501 by design (README, "Deviations from Ollama").
UNSUPPORTED = ("/api/push",)
#: Create, copy, delete and blobs: the session's service manages no models, so
#: they answer a documented 4xx for a bad request, else 501 from the service
#: (the managing service: tests/test_model_manage.py).
MANAGEMENT = ("/api/create", "/api/copy", "/api/delete", "/api/blobs/")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cap(body: Any) -> None:
    """Keep a generated request's work small (see the module docstring).  Numbers
    may come as integral floats (85.0), which the server reads as integers."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    if _number(body.get("n")):
        body["n"] = min(body["n"], 2)
        if _number(body.get("best_of")):
            body["best_of"] = body["n"]
    if isinstance(body.get("prompt"), list):
        del body["prompt"][2:]
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if _number(body.get(key)):
            body[key] = min(body[key], 8)
    options = body.get("options")
    if isinstance(options, dict) and _number(options.get("num_predict")):
        options["num_predict"] = min(options["num_predict"], 8)


class StreamItems:
    """The items of NDJSON and SSE answers against the document's item schemas.

    schemathesis validates whole JSON bodies; a stream's items are described
    per line (NDJSON) and by the ``contentSchema`` of each event's data (SSE),
    which JSON Schema treats as an annotation: this checks them."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self._validators: dict[tuple[str, str, str], Any] = {}

    def _validator(self, path: str, method: str, media: str) -> Any:
        key = (path, method, media)
        if key not in self._validators:
            content = self.doc["paths"][path][method]["responses"]["200"]["content"][media]["schema"]
            data = content["properties"]["data"] if media == "text/event-stream" else None
            # OpenAI's data is an item or [DONE]; named events (Responses, Anthropic) always an item.
            item = content if data is None else next(
                (x["contentSchema"] for x in data["anyOf"] if "contentSchema" in x), None
            ) if "anyOf" in data else data["contentSchema"]
            self._validators[key] = jsonschema_rs.validator_for({**item, "components": self.doc["components"]})
        return self._validators[key]

    def check(self, case: schemathesis.Case, response: Any) -> None:
        media = (response.headers.get("content-type") or [""])[0].split(";")[0]
        if response.status_code != 200 or media not in ("application/x-ndjson", "text/event-stream"):
            return
        assert not response.is_truncated and not response.stream_cut_short, "the stream was cut (by the client)"
        validator = self._validator(case.operation.path, case.method.lower(), media)
        text = response.content.decode()
        if media == "application/x-ndjson":
            items = [line for line in text.split("\n") if line.strip()]
        else:
            items = [line[6:] for line in text.split("\n") if line.startswith("data: ") and line != "data: [DONE]"]
            # Chat streams end with [DONE], Anthropic's with message_stop, Responses streams with
            # their terminal event; a failed one with an error.
            last_type = json.loads(items[-1]).get("type")
            ended = text.rstrip().endswith("data: [DONE]") or last_type == "message_stop" or \
                last_type in RESPONSES_TERMINAL
            assert ended or '"error"' in items[-1], text[-300:]
            # Named events (Responses, Anthropic): each event's name is its data's type.
            for block in text.split("\n\n"):
                lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
                if "event" in lines and lines["event"] != "message":
                    assert lines["event"] == json.loads(lines["data"])["type"], block[:300]
        assert items, "an empty stream"
        for item in items:
            value = json.loads(item)
            errors = [e.message for e in validator.iter_errors(value)]
            assert not errors, f"stream item violates the document: {errors[:3]}\n{item[:500]}"


class RequestBodies:
    """Whether a body conforms to an operation's documented request body."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self._validators: dict[tuple[str, str], Any] = {}

    def valid(self, op: Any, body: Any) -> bool:
        key = (op.path, op.method.lower())
        if key not in self._validators:
            schema = self.doc["paths"][op.path][op.method.lower()]["requestBody"]["content"]["application/json"]
            self._validators[key] = jsonschema_rs.validator_for({**schema["schema"],
                                                                 "components": self.doc["components"]})
        return self._validators[key].is_valid(body)


def _run_operation(op: Any, mode: Any, examples: int, base: str, session: requests.Session, streams: StreamItems,
                   bodies: RequestBodies, statuses: dict[str, Counter]) -> str:
    """Run one operation's examples; the failure, if any, as text."""
    unsupported = op.path.startswith(UNSUPPORTED)
    management = op.path.startswith(MANAGEMENT)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        if mode is schemathesis.GenerationMode.NEGATIVE and isinstance(case.body, dict):
            capped = copy.deepcopy(case.body)
            _cap(capped)
            # A case whose only break is in a field the caps rewrite (model, n, token counts) is sent
            # as generated: the caps would mend it, and the server must refuse it before any work.
            if not bodies.valid(op, capped):
                case.body = capped
        elif mode is not schemathesis.GenerationMode.NEGATIVE:
            _cap(case.body)
        try:
            _one(case)
        except Exception as e:
            raise AssertionError(f"{type(e).__name__}: {str(e)[:2000]}\nrequest body: {str(case.body)[:2000]}") \
                from None

    def _one(case: schemathesis.Case) -> None:
        if unsupported:
            response = case.call(base_url=base, session=session, timeout=60)
            assert response.status_code == 501, (response.status_code, response.text[:300])
            case.validate_response(response, checks=[c for c in CHECKS
                                                     if c not in (not_a_server_error, negative_data_rejection)])
        elif management:
            response = case.call(base_url=base, session=session, timeout=60)
            assert response.status_code in (400, 404, 405, 408, 413, 501), (response.status_code, response.text[:300])
            case.validate_response(response, checks=[c for c in CHECKS
                                                     if c not in (not_a_server_error, negative_data_rejection)])
        else:
            unread = _unread_parts(op.path, case.body)
            checks = [c for c in CHECKS if not (unread and c is negative_data_rejection)]
            response = case.call_and_validate(base_url=base, session=session, checks=checks, timeout=60)
            streams.check(case, response)
        statuses.setdefault(op.label, Counter())[response.status_code] += 1

    try:
        check()
    except Exception as e:  # noqa: BLE001 - every operation's failure is reported
        return f"{type(e).__name__}: {str(e)[:3000]}"
    return ""


def _schema_nodes(doc: dict[str, Any], node: Any, seen: set[str]) -> int:
    """How many typed nodes and $refs a schema has, each component counted once."""
    if isinstance(node, list):
        return sum(_schema_nodes(doc, x, seen) for x in node)
    if not isinstance(node, dict):
        return 0
    ref = node.get("$ref")
    if ref is not None:
        name = ref.rsplit("/", 1)[1]
        if name in seen:
            return 0
        seen.add(name)
        return 1 + _schema_nodes(doc, doc["components"]["schemas"][name], seen)
    return ("type" in node) + sum(_schema_nodes(doc, v, seen) for v in node.values())


def _examples(doc: dict[str, Any], method: str, path: str) -> int:
    """The positive examples of one operation (see the module docstring)."""
    body = doc["paths"][path][method.lower()].get("requestBody")
    if body is None:
        return EXAMPLES
    size = _schema_nodes(doc, body["content"]["application/json"]["schema"], set())
    label = f"{method.upper()} {path}"
    if label in MOSTLY_REFUSED:
        return EXAMPLES
    if label in SHARED_PARTS or size <= SMALL_BODY:
        return max(1, EXAMPLES // 4)
    return EXAMPLES


def _run(doc: dict[str, Any], base: str, statuses: dict[str, Counter]) -> list[str]:
    schema = schemathesis.openapi.from_dict(doc)
    # Read whole streams (schemathesis stops after 20 events by default): their ends are checked.
    schema.config.max_stream_events = 100_000
    schema.config.checks.negative_data_rejection = CheckConfig(expected_statuses=REFUSALS)
    session = requests.Session()
    streams = StreamItems(doc)
    bodies = RequestBodies(doc)
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        if os.environ.get("MLXGATE_SCHEMATHESIS_ONLY", op.label) != op.label:
            continue
        examples = _examples(doc, op.method, op.path)
        modes = [(schemathesis.GenerationMode.POSITIVE, examples)]
        if op.body:
            # Bodies that break the document (wrong types, missing fields, bounds): 4xx as documented.
            modes.append((schemathesis.GenerationMode.NEGATIVE, max(1, examples // 3)))
        for mode, examples in modes:
            failure = _run_operation(op, mode, examples, base, session, streams, bodies, statuses)
            if failure:
                failures.append(f"{op.label} ({mode.value}): {failure}")
    return failures


async def test_the_api_conforms_to_its_own_document(stack) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.base + "/openapi.json") as r:
            doc = await r.json()
    # The server runs on this loop: generate and send from a thread.
    statuses: dict[str, Counter] = {}
    failures = await asyncio.to_thread(_run, doc, stack.base, statuses)
    assert not failures, "\n\n".join(failures)
    if os.environ.get("MLXGATE_SCHEMATHESIS_ONLY"):
        return
    # Every operation was exercised, and the generations were answered, not only refused.
    assert len(statuses) == sum(1 for ops in doc["paths"].values() for _ in ops), statuses
    # The quarter goes where it is meant to: the shared parts' owners and the large bodies get the full count.
    reduced = {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops if _examples(doc, m, p) < EXAMPLES}
    assert set(SHARED_PARTS) <= reduced and not reduced & set(SHARED_PARTS.values()), reduced
    assert not reduced & {"POST /api/chat", "POST /api/generate", "POST /v1/responses"}, reduced
    for label in ("POST /api/generate", "POST /api/chat", "POST /v1/chat/completions", "POST /v1/completions",
                  "POST /api/embed", "POST /v1/embeddings", "POST /v1/responses", "POST /v1/messages",
                  "POST /v1/messages/count_tokens"):
        assert statuses[label][200] > 0, (label, statuses[label])
