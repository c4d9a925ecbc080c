"""Where each dialect's request body holds http(s) image URLs, and their inline form.

Read on the raw JSON, before the wire models parse it (``gateway/imagefetch.py``
fetches the URLs, then the body is translated as if the caller had sent the
images inline).  Only places of exactly the expected shape are taken; any
other shape is left for the parser to judge.  Names are the dialect's own
field paths, as its translation names them in errors.
"""

from __future__ import annotations

import base64
from typing import Any, Iterator

from gateway.imagefetch import FetchFailed, ImageSlot, data_url

#: Anthropic's media types of base64 image sources (``mlxgate.dialects.anthropic.ImageMediaType``).
_ANTHROPIC_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def _is_http(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


def _items(value: Any) -> Iterator[tuple[int, dict]]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict):
                yield i, item


def _as_data_url(holder: dict, key: str):
    def put(data: bytes, ctype: str) -> None:
        holder[key] = data_url(data, ctype)

    return put


def openai_chat(body: dict) -> list[ImageSlot]:
    """Chat completions (and vLLM's ``/tokenize``): ``messages[i].content[k].image_url(.url)``."""
    slots = []
    for i, m in _items(body.get("messages")):
        for k, part in _items(m.get("content")):
            if part.get("type") != "image_url":
                continue
            ref = part.get("image_url")
            holder, key = (ref, "url") if isinstance(ref, dict) else (part, "image_url")
            if _is_http(holder.get(key)):
                slots.append(ImageSlot(f"messages[{i}].content[{k}].image_url.url", holder[key],
                                       _as_data_url(holder, key)))
    return slots


def responses(body: dict) -> list[ImageSlot]:
    """Responses: ``input[i].content[k].image_url`` of ``input_image`` parts in messages."""
    slots = []
    for i, item in _items(body.get("input")):
        if item.get("type", "message") != "message":
            continue
        for k, part in _items(item.get("content")):
            if part.get("type") == "input_image" and _is_http(part.get("image_url")):
                slots.append(ImageSlot(f"input[{i}].content[{k}].image_url", part["image_url"],
                                       _as_data_url(part, "image_url")))
    return slots


def _anthropic_block(block: dict, where: str) -> list[ImageSlot]:
    source = block.get("source")
    if block.get("type") != "image" or not isinstance(source, dict) or source.get("type") != "url":
        return []
    if not _is_http(source.get("url")):
        return []

    def put(data: bytes, ctype: str) -> None:
        if ctype not in _ANTHROPIC_TYPES:
            raise FetchFailed(f"served as {ctype}; image sources are one of {', '.join(_ANTHROPIC_TYPES)}")
        block["source"] = {"type": "base64", "media_type": ctype, "data": base64.b64encode(data).decode("ascii")}

    return [ImageSlot(f"{where}.source.url", source["url"], put)]


def anthropic(body: dict) -> list[ImageSlot]:
    """Messages: image blocks with a ``url`` source, also inside tool results."""
    slots = []
    for i, m in _items(body.get("messages")):
        for k, block in _items(m.get("content")):
            where = f"messages[{i}].content[{k}]"
            slots += _anthropic_block(block, where)
            if block.get("type") == "tool_result":
                for j, inner in _items(block.get("content")):
                    slots += _anthropic_block(inner, f"{where}.content[{j}]")
    return slots
