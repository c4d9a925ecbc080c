"""Building prompt token ids from a request, with the model's own chat template.

Tokenizer work only (no MLX), so it runs in a worker thread, off both the
event loop and the MLX thread.
"""

from __future__ import annotations

from typing import Optional

from backends.errors import InvalidArgument, TakesNoImages
from backends.types import GenerateRequest, Message
from backends.mlx.registry import fim_tokens_in


def fim_tokens(tokenizer) -> Optional[tuple[str, str, str]]:
    return fim_tokens_in(tokenizer.get_vocab())


def is_empty(req: GenerateRequest) -> bool:
    """Ollama's "load the model and do nothing" request: no prompt text, no messages."""
    if req.prompt is not None:
        return not req.prompt.prompt and not req.prompt.suffix
    return not req.messages


def _encode_text(tokenizer, text: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    # A raw prompt that already starts with BOS must not get a second one.
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=add_special))


def _render(
    tokenizer, messages: list[dict], tools: Optional[list[dict]], model: str, think: Optional[bool] = None,
    generation_prompt: bool = True,
) -> list[int]:
    continue_final = generation_prompt and bool(messages) and messages[-1]["role"] == "assistant"
    # enable_thinking (Qwen3's name; mlx-lm renames it for templates that use
    # another) only when the request says; templates ignore unknown variables.
    extra = {} if think is None else {"enable_thinking": think}
    try:
        ids = tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            add_generation_prompt=generation_prompt and not continue_final,
            continue_final_message=continue_final,
            tokenize=True,
            **extra,
        )
    except Exception as e:  # noqa: BLE001 - jinja raises many types; all mean "bad conversation"
        raise InvalidArgument(f"messages: {model}'s chat template rejected the conversation: {e}") from None
    if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def build_prompt(req: GenerateRequest, tokenizer, model: str, generation_prompt: bool = True) -> list[int]:
    """Token ids for the request: chat template, raw prompt, or fill-in-the-middle.

    ``generation_prompt`` False (tokenizing a chat as it stands): a chat ends
    with its last message, without the assistant's header."""
    if req.prompt is not None:
        p = req.prompt
        if p.images:
            raise TakesNoImages(model)
        if p.suffix:
            fim = fim_tokens(tokenizer)
            if fim is None:
                raise InvalidArgument(f"suffix: {model} does not support insert")
            pre, suf, mid = fim
            text = f"{p.system}\n\n{p.prompt}" if p.system and not p.raw else p.prompt
            return _encode_text(tokenizer, f"{pre}{text}{suf}{p.suffix}{mid}")
        if p.raw or not tokenizer.has_chat_template:
            text = f"{p.system}\n\n{p.prompt}" if p.system and not p.raw else p.prompt
            return _encode_text(tokenizer, text)
        messages = ([Message("system", p.system)] if p.system else []) + [Message("user", p.prompt)]
        return _render(tokenizer, [m.to_template_dict() for m in messages], None, model, req.think)

    messages = req.messages or []
    if any(m.images for m in messages):
        raise TakesNoImages(model)
    tools = [t.to_template_dict() for t in req.tools]
    if tokenizer.has_chat_template:
        return _render(tokenizer, [m.to_template_dict() for m in messages], tools, model, req.think,
                       generation_prompt)
    # No template: a plain transcript the model can at least continue.
    text = "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
    return _encode_text(tokenizer, text)
