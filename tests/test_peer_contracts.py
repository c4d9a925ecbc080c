"""mlxgate against the peers' own published contracts: Ollama's and OpenAI's OpenAPI documents.

The documents are vendored in ``tests/contracts/`` (Ollama's ``docs/openapi.yaml`` verbatim;
from OpenAI's spec the operations mlxgate implements, extracted by
``tests/contracts/extract_openai.py``; each file's header says where and which commit it
came from).  schemathesis generates requests from them, positive (what the peer documents as
valid) and negative (what it documents as invalid), and sends them to the real stack (front ->
gRPC service -> MLX engine on the generated model).  Every answer must be:

- no server error (5xx), ever;
- a 200 whose body matches the peer's schema for it: a JSON body as a whole, each NDJSON line,
  each SSE event's data (``[DONE]`` aside);
- otherwise a 4xx in the dialect's error shape (Ollama ``{"error": "..."}``, OpenAI
  ``{"error": {"message", "type", "param", "code"}}``): a refusal, the README's deliberate ones
  (hosted tools, ``echo``, ``best_of``, model management...) or the generated model's own limits.

Where a peer's document is itself wrong or incomplete, ``DEVIATIONS`` names each place, why,
and how the test reads it; nothing is skipped.  Generations are capped as in
``tests/test_openapi_schemathesis.py`` (``_cap``).  MLXGATE_PEER_EXAMPLES sets the positive
examples per operation (default 12; a third as many negative ones), MLXGATE_PEER_ONLY
("openai POST /responses") runs one operation.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema_rs
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings

from tests.stack import MODEL
from tests.test_peer_answers import EMBEDDING_SIZE
from tests.test_openapi_schemathesis import _cap

pytestmark = pytest.mark.timeout(600)

CONTRACTS = Path(__file__).with_name("contracts")
EXAMPLES = int(os.environ.get("MLXGATE_PEER_EXAMPLES", "12"))

#: Where each document's paths live on mlxgate (OpenAI's servers entry is https://api.openai.com/v1).
PEERS = {"ollama": ("ollama-openapi.yaml", ""), "openai": ("openai-openapi.yaml", "/v1")}


# ---------------------------------------------------------------- the peers' own deviations


def _each(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _each(v)
    elif isinstance(node, list):
        for v in node:
            yield from _each(v)


def _nullable_refs(doc: dict[str, Any]) -> int:
    """``{"$ref": X, "nullable": true}`` -> ``anyOf: [X, null]``; returns how many."""
    n = 0
    for node in list(_each(doc)):
        if "$ref" in node and node.get("nullable") is True:
            ref = node.pop("$ref")
            del node["nullable"]
            node["anyOf"] = [{"$ref": ref}, {"type": "null"}]
            n += 1
    return n


def _nullable_types(doc: dict[str, Any]) -> int:
    """``{"type": T, "nullable": true}`` (OpenAPI 3.0) -> ``type: [T, "null"]``; returns how many."""
    n = 0
    for node in list(_each(doc)):
        if node.get("nullable") is True and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            del node["nullable"]
            n += 1
    return n


def _completions_stream(doc: dict[str, Any]) -> int:
    """POST /completions documents no stream: OpenAI's reference streams CreateCompletionResponse objects."""
    content = doc["paths"]["/completions"]["post"]["responses"]["200"]["content"]
    if "text/event-stream" in content:
        return 0
    content["text/event-stream"] = {"schema": {"$ref": "#/components/schemas/CreateCompletionResponse"}}
    return 1


def _base64_embeddings(doc: dict[str, Any]) -> int:
    """Embedding.embedding is documented as floats only; with ``encoding_format: "base64"``
    (in the request schema) OpenAI answers a base64 string of little-endian float32s."""
    prop = doc["components"]["schemas"]["Embedding"]["properties"]
    if prop["embedding"].get("type") != "array":
        return 0
    prop["embedding"] = {"anyOf": [prop["embedding"], {"type": "string", "contentEncoding": "base64"}]}
    return 1


def _unmapped_discriminators(doc: dict[str, Any]) -> int:
    """Counted, not changed: JSON Schema validation ignores ``discriminator`` and reads every
    branch of the anyOf/oneOf beside it, which is what a discriminator without a mapping
    (the branch named by each branch's own ``type`` const) comes to."""
    return sum(1 for node in _each(doc) if isinstance(node.get("discriminator"), dict)
               and "mapping" not in node["discriminator"])


def _delete_404(doc: dict[str, Any]) -> int:
    """DELETE /responses/{response_id}'s 404 is documented as ``Error``, the inner object."""
    media = doc["paths"]["/responses/{response_id}"]["delete"]["responses"]["404"]["content"]["application/json"]
    if media["schema"] != {"$ref": "#/components/schemas/Error"}:
        return 0
    media["schema"] = {"$ref": "#/components/schemas/ErrorResponse"}
    return 1


@dataclass(frozen=True)
class Deviation:
    peer: str
    where: str
    what: str
    reason: str
    #: How the test reads the document instead (returns the places changed; 0 means the
    #: document no longer has the mistake, and the row must go).  None: the checks below say.
    fix: Callable[[dict[str, Any]], int] | None = None


DEVIATIONS: list[Deviation] = [
    Deviation("ollama", "every operation", "documents only 200",
              "Ollama's handlers answer 400/404/500 with {\"error\": ...} (server/routes.go); a non-200 is "
              "checked as a 4xx in that shape instead of as undocumented"),
    Deviation("openai", "every operation", "documents only 200 (and 429; 404 for DELETE /responses/{id})",
              "OpenAI answers 400/401/404 with its Error object; a non-200 is checked as a 4xx in that shape"),
    Deviation("openai", "components (several)", "`nullable: true` beside `$ref`",
              "OpenAPI 3.1 ignores siblings of $ref and has no `nullable`: the null OpenAI sends (and that "
              "its SDK accepts) would fail; read as anyOf [$ref, null]", _nullable_refs),
    Deviation("openai", "components (several)", "`nullable: true` beside `type` (OpenAPI 3.0 spelling in a 3.1 "
              "document)", "read as type [T, \"null\"], what the 3.0 keyword means", _nullable_types),
    Deviation("openai", "POST /completions", "no text/event-stream answer documented",
              "`stream: true` is in its request schema; OpenAI's reference streams CreateCompletionResponse "
              "objects, so each event is checked against that", _completions_stream),
    Deviation("openai", "Embedding.embedding", "documented as an array of floats only",
              "with `encoding_format: \"base64\"` OpenAI (and its SDK, which decodes it) has a base64 string "
              "there; read as array or base64 string", _base64_embeddings),
    Deviation("openai", "InputItem, Item, ChatCompletionRequestMessage, ... (40 places)",
              "`discriminator` without a `mapping`",
              "an annotation only: validation reads the anyOf/oneOf it sits beside, every branch",
              _unmapped_discriminators),
    Deviation("openai", "DELETE /responses/{response_id} 404", "documented as `Error`, the inner object",
              "OpenAI's error bodies are ErrorResponse ({\"error\": Error}), as its other answers and its SDK "
              "read them; every non-200 is checked against ErrorResponse", _delete_404),
    Deviation("ollama", "POST /api/push; POST /api/create, /api/copy, DELETE /api/delete here",
              "mlxgate's own: push is 501 by design (README, Deviations from Ollama); the session's service "
              "is built without model management (tests/test_model_manage.py has the managing one)",
              "push is checked as 501, create/copy/delete as a 4xx for a bad body, else 501, in Ollama's error "
              "shape; pull goes to an empty fake hub, so it is a 4xx like any refused request"),
]

#: mlxgate's deliberate 501 (the last row above).
UNSUPPORTED = ("/api/push",)
#: Model management the session's service does not run (the last row above).
MANAGEMENT = ("/api/create", "/api/copy", "/api/delete")


def load(peer: str) -> dict[str, Any]:
    name, _ = PEERS[peer]
    doc = yaml.safe_load((CONTRACTS / name).read_text())
    for d in DEVIATIONS:
        if d.peer == peer and d.fix is not None:
            assert d.fix(doc) > 0, f"the deviation {d.where}: {d.what} is gone from the document: remove its row"
    return doc


# ---------------------------------------------------------------- checking answers


class Answers:
    """Every answer of one peer's operations, against that peer's document."""

    def __init__(self, peer: str, doc: dict[str, Any]) -> None:
        self.peer = peer
        self.doc = doc
        self._validators: dict[Any, Any] = {}

    def _validator(self, path: str, method: str, media: str) -> Any:
        key = (path, method, media)
        if key not in self._validators:
            content = self.doc["paths"][path][method]["responses"]["200"].get("content") or {}
            assert media in content, f"{method.upper()} {path} answered 200 as {media}, not documented: {content}"
            schema = content[media]["schema"]
            self._validators[key] = jsonschema_rs.validator_for({**schema, "components": self.doc["components"]})
        return self._validators[key]

    def _valid(self, validator: Any, value: Any, what: str) -> None:
        errors = [f"{e.message} at {list(e.instance_path)}" for e in validator.iter_errors(value)]
        assert not errors, f"{what} violates the {self.peer} document: {errors[:3]}\n{json.dumps(value)[:800]}"

    def error_shape(self, status: int, body: Any) -> None:
        """The peer's own error schema (``ErrorResponse`` in both documents), and a message."""
        if "error" not in self._validators:
            self._validators["error"] = jsonschema_rs.validator_for(
                {"$ref": "#/components/schemas/ErrorResponse", "components": self.doc["components"]})
        self._valid(self._validators["error"], body, f"a {status} body")
        if self.peer == "ollama":
            assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
        else:
            err = body.get("error") if isinstance(body, dict) else None
            assert isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"], body
            assert {"type", "param", "code"} <= set(err), body

    def check(self, case: schemathesis.Case, response: Any) -> None:
        status = response.status_code
        media = (response.headers.get("content-type") or [""])[0].split(";")[0]
        path, method = case.operation.path, case.method.lower()
        if path in UNSUPPORTED or path in MANAGEMENT:
            assert status == 501 or (path in MANAGEMENT and 400 <= status < 500), (status, response.content[:300])
            self.error_shape(status, response.json())
            return
        assert status < 500, f"server error {status}: {response.content[:500]!r}"
        if status != 200:
            assert 400 <= status < 500, (status, response.content[:300])
            self.error_shape(status, response.json())
            return
        text = response.content.decode()
        if not text and not (self.doc["paths"][path][method]["responses"]["200"].get("content")):
            return  # a 200 documented without a body (DELETE /api/delete, POST /api/copy)
        validator = self._validator(path, method, media)
        if media == "application/x-ndjson":
            lines = [line for line in text.split("\n") if line.strip()]
            assert lines, "an empty stream"
            for line in lines:
                self._valid(validator, json.loads(line), "an NDJSON line")
        elif media == "text/event-stream":
            assert not response.is_truncated and not response.stream_cut_short, "the stream was cut (by the client)"
            data = [line[6:] for line in text.split("\n") if line.startswith("data: ") and line != "data: [DONE]"]
            assert data, "an empty stream"
            for item in data:
                self._valid(validator, json.loads(item), "an SSE event")
        else:
            self._valid(validator, response.json(), "the body")


def _bodies(case: schemathesis.Case) -> None:
    """Keep work small (``_cap``) and name the test model: also where OpenAI's schema leaves
    ``model`` out (CreateResponse: a stored ``prompt`` may name one, which is OpenAI's own)."""
    if isinstance(case.body, dict) and "model" not in case.body and case.operation.path == "/responses":
        case.body["model"] = MODEL
    _cap(case.body)
    # The generated model's embedding size: beyond it OpenAI's dialect is 400 (tests/test_peer_answers.py).
    dims = case.body.get("dimensions") if isinstance(case.body, dict) else None
    if isinstance(dims, (int, float)) and not isinstance(dims, bool):
        case.body["dimensions"] = min(dims, EMBEDDING_SIZE)


def _run_operation(answers: Answers, op: Any, mode: Any, examples: int, base: str, session: requests.Session,
                   statuses: dict[str, Counter]) -> str:
    # derandomize: the same examples every run (a bounded sample must not pass or fail by chance).
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        _bodies(case)
        try:
            response = case.call(base_url=base, session=session, timeout=60)
            answers.check(case, response)
        except Exception as e:
            raise AssertionError(f"{type(e).__name__}: {str(e)[:2000]}\nrequest: {case.method} {case.formatted_path}"
                                 f" {str(case.body)[:1500]}") from None
        statuses.setdefault(f"{answers.peer} {op.label}", Counter())[response.status_code] += 1

    try:
        check()
    except Exception as e:  # noqa: BLE001 - every operation's failure is reported
        return f"{type(e).__name__}: {str(e)[:3000]}"
    return ""


def _run(peer: str, base: str, statuses: dict[str, Counter]) -> list[str]:
    doc = load(peer)
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.max_stream_events = 100_000
    session = requests.Session()
    answers = Answers(peer, doc)
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{peer} {op.label}"
        if os.environ.get("MLXGATE_PEER_ONLY", label) != label:
            continue
        modes = [(schemathesis.GenerationMode.POSITIVE, EXAMPLES)]
        if op.body:
            modes.append((schemathesis.GenerationMode.NEGATIVE, max(1, EXAMPLES // 3)))
        for mode, examples in modes:
            failure = _run_operation(answers, op, mode, examples, base + PEERS[peer][1], session, statuses)
            if failure:
                failures.append(f"{label} ({mode.value}): {failure}")
    return failures


@pytest.mark.parametrize("peer", list(PEERS))
async def test_mlxgate_answers_as_the_peers_document(stack, peer) -> None:
    statuses: dict[str, Counter] = {}
    failures = await asyncio.to_thread(_run, peer, stack.base, statuses)
    assert not failures, "\n\n".join(failures)
    if os.environ.get("MLXGATE_PEER_ONLY"):
        return
    doc = load(peer)
    # Every documented operation was sent, and the generations were answered, not only refused.
    assert len(statuses) == sum(1 for item in doc["paths"].values() for m in item if m != "parameters"), statuses
    generations = {"ollama": ("POST /api/generate", "POST /api/chat", "POST /api/embed"),
                   "openai": ("POST /chat/completions", "POST /completions", "POST /embeddings", "POST /responses")}
    for label in generations[peer]:
        assert statuses[f"{peer} {label}"][200] > 0, (label, statuses[f"{peer} {label}"])


def test_every_deviation_names_a_reason() -> None:
    """The table is the place for each: one row per mistake, each with its reason, and a fix
    that still finds its mistake in the vendored document (``load`` checks)."""
    for peer in PEERS:
        load(peer)
    assert len({(d.peer, d.where, d.what) for d in DEVIATIONS}) == len(DEVIATIONS)
    assert all(d.reason for d in DEVIATIONS)
