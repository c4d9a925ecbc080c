"""One request builder per layer and dialect: a chat as the backends see it
(``backends.types.GenerateRequest``), as a gRPC caller sends it
(``pb.GenerateRequest``), and as an HTTP client posts it (Ollama's /api/chat
and OpenAI's /v1/chat/completions share the minimal body; Anthropic's
/v1/messages needs ``max_tokens``).  A test names only what it cares about;
the rest is one user message, "hi".

The dataclasses are built by keyword, so that they read the same whatever
order their fields are declared in.  (Not ``tests/requests.py``: that name
would read as the ``requests`` package.)
"""

from __future__ import annotations

from typing import Any, Optional, Union

from backends.types import GenerateRequest, Message, Sampling
from mlxgate.v1 import inference_pb2 as pb


def chat(model: str = "m", text: str = "hi", *, messages: Optional[list[Message]] = None,
         sampling: Union[Sampling, dict[str, Any], None] = None, **fields: Any) -> GenerateRequest:
    """A chat request: ``messages``, else one user message ``text``; ``sampling``
    a Sampling or its fields; other keywords are GenerateRequest fields."""
    if sampling is not None:
        fields["sampling"] = Sampling(**sampling) if isinstance(sampling, dict) else sampling
    messages = list(messages) if messages else [Message(role="user", content=text)]
    return GenerateRequest(model=model, messages=messages, **fields)


def pb_chat(model: str = "m", text: str = "hi", **sampling: Any) -> pb.GenerateRequest:
    """The same chat as a gRPC caller sends it; keywords are SamplingParams fields."""
    return pb.GenerateRequest(
        model=model,
        chat=pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)]),
        sampling=pb.SamplingParams(**sampling),
    )


def chat_body(model: str = "m", text: str = "hi", **fields: Any) -> dict[str, Any]:
    """A minimal /api/chat or /v1/chat/completions body; keywords are added or replace."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


def anthropic_body(model: str = "m", text: str = "hi", max_tokens: int = 8, **fields: Any) -> dict[str, Any]:
    """A minimal /v1/messages body; keywords are added or replace."""
    return {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}], **fields}
