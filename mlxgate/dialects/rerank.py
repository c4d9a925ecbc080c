"""Rerank: the Jina / Cohere shape vLLM serves on ``/v1/rerank``, ``/rerank`` and ``/v2/rerank``.

The front parses requests with ``RerankRequest`` and renders
``RerankResponse``; the cloud adapter sends the same request to a provider's
``/rerank`` and reads its answer against the same shapes.  Documents are
strings or ``{"text": ...}`` objects (Jina's and Cohere's v1 form); results
carry ``document`` unless ``return_documents`` is false.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field
from typing_extensions import Annotated, NotRequired, TypedDict

from mlxgate import limits
from mlxgate.dialects.base import INT32_MAX, Limit, ModelName, WireModel, ignored, integer

_IGNORED = "accepted and ignored"


class Document(WireModel):
    text: str


class RerankRequest(WireModel):
    """POST /v1/rerank (also /rerank and /v2/rerank)."""

    model: Annotated[ModelName, Field(min_length=1)]
    query: Annotated[str, Field(min_length=1)]
    documents: Annotated[
        list[Union[str, Document]], Field(min_length=1), Limit(maxItems=limits.MAX_RERANK_DOCUMENTS)
    ] = Field(description=(
        f"strings or {{\"text\": ...}} objects, each non-empty and cut to fit the model's context; all of them "
        f"together at most {limits.MAX_RERANK_TOKENS} tokens after cutting (for a causal model each with the "
        "query and the judging prompt): 400 naming documents beyond"))
    top_n: Optional[integer(0, INT32_MAX)] = Field(
        None, description="results to return, best first; 0 or absent: all")
    return_documents: Optional[bool] = Field(None, description="include each result's document (default true)")
    instruction: Optional[Annotated[str, Limit(maxLength=limits.MAX_RERANK_INSTRUCTION_CHARS)]] = Field(
        None, description="causal models: the task line of the judging prompt (Qwen3-Reranker's <Instruct>); "
                          "default: \"Given a web search query, retrieve relevant passages that answer the query\"")
    truncate_prompt_tokens: Optional[ignored({"type": "integer"})] = None
    rank_fields: Optional[ignored({"type": "array"})] = None
    max_chunks_per_doc: Optional[ignored({"type": "integer"})] = None
    max_tokens_per_doc: Optional[ignored({"type": "integer"})] = None
    user: Optional[Any] = Field(None, description=_IGNORED)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


# ---------------------------------------------------------------- responses


class ResultDocument(TypedDict):
    text: str


class Result(TypedDict):
    index: int
    relevance_score: float
    document: NotRequired[ResultDocument]


class Usage(TypedDict):
    total_tokens: int


class RerankResponse(TypedDict):
    """Results sorted by relevance_score, highest first (equal scores in the documents' order)."""

    id: str
    model: str
    usage: Usage
    results: list[Result]
