"""``mlxgate run NAME [PROMPT]``: the answer of ``/api/chat`` streamed to
stdout; without a prompt, a chat that reads one message per line from stdin
and keeps the conversation, until ``/bye`` or the end of input.  A model the
server does not have is pulled first, as Ollama's ``run`` does."""

from __future__ import annotations

from typing import Any, Optional, TextIO

from mlxgate_cli.client import commands
from mlxgate_cli.client.api import ApiError, OllamaAPI

PROMPT = ">>> "
BYE = "/bye"


def ensure_model(api: OllamaAPI, name: str, err: TextIO) -> None:
    """``/api/show``; on 404 a plain ``/api/pull``.  A server that cannot
    pull (501), does not know the name either (404) or lets only admin keys
    pull (403) leaves the "not found" as the answer."""
    try:
        api.post("/api/show", {"model": name})
        return
    except ApiError as e:
        if e.status != 404:
            raise
        missing = e
    try:
        commands.pull(api, name, err)
    except ApiError as e:
        if e.status in (403, 404, 405, 501):
            raise missing from None
        raise


def answer(api: OllamaAPI, model: str, messages: list[dict[str, Any]], out: TextIO) -> str:
    """Stream one answer to ``out``; the assistant's text (for the history)."""
    text: list[str] = []
    thinking = False
    for obj in api.stream("/api/chat", {"model": model, "messages": messages}):
        msg = obj.get("message") or {}
        if msg.get("thinking"):
            if not thinking:
                out.write("Thinking...\n")
                thinking = True
            out.write(str(msg["thinking"]))
        content = str(msg.get("content") or "")
        if content:
            if thinking:
                out.write("\n...done thinking.\n\n")
                thinking = False
            out.write(content)
            text.append(content)
        out.flush()
    if thinking:
        out.write("\n...done thinking.\n\n")
    full = "".join(text)
    if not full.endswith("\n"):
        out.write("\n")
    out.flush()
    return full


def run(api: OllamaAPI, model: str, prompt: Optional[str], stdin: TextIO, out: TextIO, err: TextIO) -> None:
    ensure_model(api, model, err)
    if prompt is not None:
        answer(api, model, [{"role": "user", "content": prompt}], out)
        return
    interactive = stdin.isatty()
    messages: list[dict[str, Any]] = []
    while True:
        if interactive:
            out.write(PROMPT)
            out.flush()
        line = stdin.readline()
        if not line:  # end of input
            if interactive:
                out.write("\n")
            return
        text = line.rstrip("\r\n")
        if text.strip() == BYE:
            return
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": answer(api, model, messages, out)})
        if interactive:
            out.write("\n")
