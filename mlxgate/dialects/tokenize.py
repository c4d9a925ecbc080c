"""Tokenize and detokenize: Ollama's proposed ``/api/tokenize`` and ``/api/detokenize``
(ollama/ollama#12031) and vLLM's ``/tokenize`` and ``/detokenize``.

Ollama's tokenize takes ``content`` and adds no special tokens (its runner
tokenizes without BOS); vLLM's takes a ``prompt`` (special tokens added by
default) or ``messages`` rendered with the chat template (the generation
prompt added by default), and answers ``count`` and ``max_model_len`` too.
Token ids are the model's own; ids outside its vocabulary are 400.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field
from typing_extensions import Annotated, NotRequired, TypedDict

from mlxgate import limits
from mlxgate.dialects.base import INT32_MAX, INT32_MIN, Limit, ModelName, Tool, WireModel, ignored, integer
from mlxgate.dialects.ollama import KeepAlive
from mlxgate.dialects.openai import ChatMessage

_IGNORED = "accepted and ignored"

#: A token id: an int32 (the proto's type); whether it is in the vocabulary is the model's to say.
TokenId = integer(INT32_MIN, INT32_MAX)
TokenIds = Annotated[list[TokenId], Limit(maxItems=limits.MAX_DETOKENIZE_TOKENS)]


# ---------------------------------------------------------------- Ollama


class OllamaTokenizeRequest(WireModel):
    """POST /api/tokenize."""

    model: Annotated[ModelName, Field(min_length=1)]
    content: str = Field(description="text, tokenized as it is (no special tokens added); at most the model's "
                                     "context length in tokens")
    keep_alive: Optional[KeepAlive] = None
    options: Optional[ignored({"type": "object"})] = None
    media_type: Optional[ignored({"type": "string"})] = None


class OllamaTokenizeResponse(TypedDict):
    model: str
    tokens: list[int]


class OllamaDetokenizeRequest(WireModel):
    """POST /api/detokenize."""

    model: Annotated[ModelName, Field(min_length=1)]
    tokens: TokenIds
    keep_alive: Optional[KeepAlive] = None
    options: Optional[ignored({"type": "object"})] = None


class OllamaDetokenizeResponse(TypedDict):
    model: str
    content: str


# ---------------------------------------------------------------- vLLM


class TokenizeCompletionRequest(WireModel):
    """POST /tokenize with a prompt."""

    model: Annotated[ModelName, Field(min_length=1)]
    prompt: str = Field(description="at most the model's context length in tokens")
    add_special_tokens: Optional[bool] = Field(None, description="add special tokens (BOS); default true")
    return_token_strs: Optional[bool] = Field(None, description="also answer each token's text")


class TokenizeChatRequest(WireModel):
    """POST /tokenize with messages, rendered with the model's chat template as a chat request is."""

    model: Annotated[ModelName, Field(min_length=1)]
    messages: Annotated[list[ChatMessage], Limit(maxItems=limits.MAX_MESSAGES)]
    tools: Optional[Annotated[list[Tool], Limit(maxItems=limits.MAX_TOOLS)]] = None
    add_generation_prompt: Optional[bool] = Field(
        None, description="end with the assistant's generation prompt (default true): the count is then the "
                          "prompt_tokens of a chat completion with these messages")
    return_token_strs: Optional[bool] = Field(None, description="also answer each token's text")
    add_special_tokens: Optional[ignored({"type": "boolean"})] = None
    continue_final_message: Optional[ignored({"type": "boolean"})] = None
    chat_template: Optional[ignored({"type": "string"})] = None
    chat_template_kwargs: Optional[ignored({"type": "object"})] = None


TokenizeRequest = Union[TokenizeChatRequest, TokenizeCompletionRequest]


class TokenizeResponse(TypedDict):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: NotRequired[list[str]]


class DetokenizeRequest(WireModel):
    """POST /detokenize."""

    model: Annotated[ModelName, Field(min_length=1)]
    tokens: TokenIds


class DetokenizeResponse(TypedDict):
    prompt: str


def tokenize_request_model(data: dict[str, Any]) -> type[WireModel]:
    """Which of vLLM's two tokenize requests a body is: messages make a chat."""
    return TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
