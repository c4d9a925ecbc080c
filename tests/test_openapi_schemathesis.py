"""Property-based checking of the HTTP API from its own OpenAPI document.

schemathesis generates requests for every operation of the generated
/openapi.json and sends them to the real stack (front -> gRPC service -> MLX
engine on the generated model); every answer must be no server error, have a
documented status, content type, headers and body (checks below), and the
items of NDJSON and SSE streams must match their item schemas.  Operations
with a body are also sent bodies that break the document (schemathesis's
negative mode): they must be refused with a documented 4xx, never a 500.  Pull
and push answer 501 by design: for them the check is that they do, in the
documented shape; create, copy, delete and blobs on the session's service
(which manages no models) a documented 4xx or 501.

Cost.  The server bounds every request (the contract's limits, the model's
2,048-token context), but a generated ``n`` of 128 with ``max_tokens`` 2**31
is still 128 context-fulls of tokens: the test caps ``n`` at 2 and token
counts at 8 (``max_output_tokens`` of the Responses API too), and sends the
generated body's ``model`` as the test model so that generations happen at
all (unknown models are covered by the error tests).
MLXGATE_SCHEMATHESIS_EXAMPLES sets the examples per operation
(default 100: about 40 s alone on 2 cores); MLXGATE_SCHEMATHESIS_ONLY
(an operation's label, "POST /api/chat") runs one operation.
"""

from __future__ import annotations

import asyncio
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
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
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
]
#: The last event of a Responses stream (named events, no [DONE]).
RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
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


def _run_operation(op: Any, mode: Any, examples: int, base: str, session: requests.Session, streams: StreamItems,
                   statuses: dict[str, Counter]) -> str:
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
            case.validate_response(response, checks=[c for c in CHECKS if c is not not_a_server_error])
        elif management:
            response = case.call(base_url=base, session=session, timeout=60)
            assert response.status_code in (400, 404, 405, 408, 413, 501), (response.status_code, response.text[:300])
            case.validate_response(response, checks=[c for c in CHECKS if c is not not_a_server_error])
        else:
            response = case.call_and_validate(base_url=base, session=session, checks=CHECKS, timeout=60)
            streams.check(case, response)
        statuses.setdefault(op.label, Counter())[response.status_code] += 1

    try:
        check()
    except Exception as e:  # noqa: BLE001 - every operation's failure is reported
        return f"{type(e).__name__}: {str(e)[:3000]}"
    return ""


def _run(doc: dict[str, Any], base: str, statuses: dict[str, Counter]) -> list[str]:
    schema = schemathesis.openapi.from_dict(doc)
    # Read whole streams (schemathesis stops after 20 events by default): their ends are checked.
    schema.config.max_stream_events = 100_000
    session = requests.Session()
    streams = StreamItems(doc)
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        if os.environ.get("MLXGATE_SCHEMATHESIS_ONLY", op.label) != op.label:
            continue
        modes = [(schemathesis.GenerationMode.POSITIVE, EXAMPLES)]
        if op.body:
            # Bodies that break the document (wrong types, missing fields, bounds): 4xx as documented.
            modes.append((schemathesis.GenerationMode.NEGATIVE, max(1, EXAMPLES // 3)))
        for mode, examples in modes:
            failure = _run_operation(op, mode, examples, base, session, streams, statuses)
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
    for label in ("POST /api/generate", "POST /api/chat", "POST /v1/chat/completions", "POST /v1/completions",
                  "POST /api/embed", "POST /v1/embeddings", "POST /v1/responses", "POST /v1/messages",
                  "POST /v1/messages/count_tokens"):
        assert statuses[label][200] > 0, (label, statuses[label])
