"""A VLM request's prompt: chat template, images decoded, the processor's expansion.

Worker thread (tokenizer and image work, no MLX).  A request without images
is built by ``backends/mlx/prompt.py`` as for any text model; one with
images is rendered to text with the model's chat template (each image a
``{"type": "image"}`` part before the message's text, as Hugging Face
templates take them), then the processor resizes the images and expands
each placeholder into the model's image tokens.  The result is a list of
prompt ids (image tokens included, so they count in the context and in
``prompt_tokens``) carrying the pixel inputs and the prompt-cache key.

The key is the prompt ids with every image token replaced by a value drawn
from the content of all the request's images: a later turn about the same
images shares the prefix and reuses the cache; the same text with other
images never does.
"""

from __future__ import annotations

import hashlib
import time
from typing import Optional

from backends.errors import InvalidArgument
from backends.types import GenerateRequest, Message
from backends.mlx.vision.detail import downscale
from backends.mlx.vision.images import decode


class VisionIds(list):
    """Prompt ids of a request with images, and what the prefill needs."""

    #: The processor's tensors other than the ids (pixel_values, masks, grids ...), as numpy arrays.
    pixels: dict
    #: The ids as the prompt cache files them (image tokens keyed by image content).
    key: list
    #: Index of the first image token, and one past the last.
    first_image: int
    end_image: int
    images: int
    #: Seconds spent decoding and preprocessing the images.
    seconds: float


def request_images(req: GenerateRequest) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image of the request, in prompt order."""
    if req.prompt is not None:
        return [(f"prompt.images[{j}]", b) for j, b in enumerate(req.prompt.images)]
    return [(f"messages[{i}].images[{j}]", b) for i, m in enumerate(req.messages or []) for j, b in enumerate(m.images)]


def request_details(req: GenerateRequest) -> list[str]:
    """Every image's detail ("low", "high" or "auto"), in the order of ``request_images``."""
    if req.prompt is not None:
        return ["auto"] * len(req.prompt.images)
    return [d for m in req.messages or [] for d in m.details()]


def has_images(req: GenerateRequest) -> bool:
    if req.prompt is not None:
        return bool(req.prompt.images)
    return any(m.images for m in req.messages or [])


def _template_dict(m: Message) -> dict:
    d = m.to_template_dict()
    if m.images:
        d["content"] = [{"type": "image"} for _ in m.images] + ([{"type": "text", "text": m.content}]
                                                                  if m.content else [])
    return d


#: Image tokens whose chat templates bracket them (Qwen2-VL / Qwen2.5-VL: M-RoPE finds an image by its start).
_BRACKETS = {"<|image_pad|>": ("<|vision_start|>", "<|vision_end|>")}


def _image_token_text(processor) -> str:
    """What a prompt holds per image before expansion, as the chat template
    writes it: Gemma 3's begin-of-image token (its image token is what that
    expands to), Qwen's image token between its vision brackets, else the image token."""
    token = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None)
    if not isinstance(token, str):
        raise InvalidArgument("raw prompts with images need a model whose processor names its image token")
    start, end = _BRACKETS.get(token, ("", ""))
    added = getattr(getattr(processor, "tokenizer", processor), "added_tokens_encoder", {})
    if start and start in added and end in added:
        return start + token + end
    return token


def _text(req: GenerateRequest, processor, model: str) -> str:
    tok = getattr(processor, "tokenizer", processor)
    if req.prompt is not None:
        p = req.prompt
        if p.suffix:
            raise InvalidArgument(f"suffix: {model} does not support insert with images")
        if p.raw:
            return _image_token_text(processor) * len(p.images) + p.prompt
        messages = ([Message("system", p.system)] if p.system else []) + [Message("user", p.prompt, images=p.images)]
        tools = None
    else:
        messages = req.messages or []
        tools = [t.to_template_dict() for t in req.tools] or None
    dicts = [_template_dict(m) for m in messages]
    continue_final = bool(dicts) and dicts[-1]["role"] == "assistant"
    extra = {} if req.think is None else {"enable_thinking": req.think}
    try:
        return tok.apply_chat_template(dicts, tools=tools, add_generation_prompt=not continue_final,
                                       continue_final_message=continue_final, tokenize=False, **extra)
    except Exception as e:  # noqa: BLE001 - jinja raises many types; all mean "bad conversation"
        raise InvalidArgument(f"messages: {model}'s chat template rejected the conversation: {e}") from None


def _key(ids: list[int], image_ids: frozenset, images: list[bytes], details: list[str]) -> tuple[list, int, int]:
    digest = hashlib.sha256()
    for data, detail in zip(images, details):
        digest.update(hashlib.sha256(data).digest() + detail.encode())
    # Negative: never a real token id.
    salt = -1 - int.from_bytes(digest.digest()[:8], "big") % (1 << 62)
    key, first, end = [], len(ids), 0
    for i, t in enumerate(ids):
        if t in image_ids:
            key.append(salt)
            first, end = min(first, i), i + 1
        else:
            key.append(t)
    return key, first, end


def _adds_bos(tok) -> bool:
    """Whether the tokenizer starts what it encodes with its bos token."""
    ids = tok("")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def build(req: GenerateRequest, vision, model: str) -> VisionIds:
    """Prompt ids of a request with images for the VLM ``vision`` (``loader.Vision``)."""
    named, details = request_images(req), request_details(req)
    t0 = time.perf_counter()
    pictures = [downscale(decode(data, name), d) for (name, data), d in zip(named, details)]
    text = _text(req, vision.processor, model)
    tok = getattr(vision.processor, "tokenizer", vision.processor)
    processor = vision.processor
    if vision.untiled_processor is not None and all(d == "low" for d in details):
        processor = vision.untiled_processor
    bos: Optional[str] = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tok):
        # The tokenizer adds it again; not ``add_special_tokens=False``: some
        # processors (LLaVA's) hand every keyword to the image processor too.
        text = text[len(bos):]
    try:
        out = processor(text=[text], images=pictures, return_tensors="np")
    except (ValueError, TypeError, IndexError) as e:
        raise InvalidArgument(f"images: {model}'s processor refused the request: {e}") from None
    ids = [int(t) for t in out["input_ids"][0]]
    result = VisionIds(ids)
    result.pixels = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask") and v is not None}
    result.key, result.first_image, result.end_image = _key(ids, vision.image_token_ids, [d for _, d in named],
                                                                 details)
    result.images = len(pictures)
    result.seconds = time.perf_counter() - t0
    if result.end_image == 0:
        raise InvalidArgument(f"images: {model}'s chat template placed no image in the prompt")
    return result
