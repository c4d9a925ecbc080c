"""Rerank requests onto ``pb.RerankRequest``, and ``pb.RerankResponse`` back (no I/O)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from gateway.parsing import parse
from mlxgate.dialects import rerank as wire
from mlxgate.v1 import inference_pb2 as pb


@dataclass
class Parsed:
    req: pb.RerankRequest
    #: The documents' texts, for results that carry them.
    texts: list[str]
    return_documents: bool


def rerank_request(data: dict[str, Any], route: str) -> Parsed:
    r = parse(wire.RerankRequest, data, route)
    texts = r.texts()
    req = pb.RerankRequest(model=r.model, query=r.query, documents=texts, top_n=r.top_n or 0,
                           instruction=r.instruction or "")
    return Parsed(req, texts, r.return_documents is not False)


def rerank_response(p: Parsed, res: pb.RerankResponse) -> wire.RerankResponse:
    results: list[wire.Result] = []
    for r in res.results:
        item: wire.Result = {"index": r.index, "relevance_score": r.relevance_score}
        if p.return_documents and 0 <= r.index < len(p.texts):
            item["document"] = {"text": p.texts[r.index]}
        results.append(item)
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": p.req.model,
        "usage": {"total_tokens": res.total_tokens},
        "results": results,
    }
