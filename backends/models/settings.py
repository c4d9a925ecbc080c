"""A managed model's own settings applied to every request for its name.

``ollama create`` gives a name a system message, default parameters and
leading messages (``StoredModel.system`` / ``parameters`` / ``messages``).
They are applied once, in the service's accept step (``backends.servicer``),
so every caller -- Ollama, OpenAI, Anthropic, Responses, gRPC -- gets them,
the way Ollama's ``GenerateHandler`` and ``ChatHandler`` apply them:

- a sampling value the request leaves unset takes the model's (``stop`` as a
  whole list);
- chat: the model's messages go before the request's, and its system message
  before those unless the request starts with a system message of its own;
- a prompt (``/api/generate``, completions): the model's system unless the
  request has one; with leading messages the prompt becomes a chat (system,
  the model's messages, the prompt as the user's).  A raw prompt, a
  fill-in-the-middle one and a "just load it" request take only parameters.

Parameters are kept by their Ollama option names (``num_predict``, ``stop``);
``mlxgate.dialects.ollama.OPTION_OF_SAMPLING`` maps them onto the contract.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from backends.models.store import StoredModel
from backends.types import GenerateRequest, Message, ModelShow, Sampling
from mlxgate.dialects.ollama import OPTION_OF_SAMPLING

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(Sampling)} - {"stop"}


def sampling_of(parameters: dict[str, Any]) -> Sampling:
    """Ollama-named parameters as the contract's sampling (unknown names left out)."""
    kw = {f: parameters[o] for f, o in OPTION_OF_SAMPLING.items() if f in _SAMPLING_FIELDS and o in parameters}
    stop = parameters.get("stop") or []
    return Sampling(stop=[stop] if isinstance(stop, str) else list(stop), **kw)


def parameters_of(sampling: Sampling) -> dict[str, Any]:
    """The contract's sampling as Ollama-named parameters (unset ones left out)."""
    out: dict[str, Any] = {o: v for f, o in OPTION_OF_SAMPLING.items() if (v := getattr(sampling, f)) is not None}
    if sampling.stop:
        out["stop"] = list(sampling.stop)
    return out


def messages_of(stored: list) -> list[Message]:
    return [Message(role=m.get("role", "user"), content=m.get("content", "")) for m in stored if isinstance(m, dict)]


def _with_defaults(sampling: Sampling, defaults: Sampling) -> Sampling:
    changes = {f: getattr(defaults, f) for f in _SAMPLING_FIELDS
               if getattr(sampling, f) is None and getattr(defaults, f) is not None}
    if not sampling.stop and defaults.stop:
        changes["stop"] = list(defaults.stop)
    return dataclasses.replace(sampling, **changes) if changes else sampling


def apply(req: GenerateRequest, model: StoredModel) -> GenerateRequest:
    """``req`` with ``model``'s settings where the request gives none."""
    changes: dict[str, Any] = {}
    if model.parameters:
        sampling = _with_defaults(req.sampling, sampling_of(model.parameters))
        if sampling is not req.sampling:
            changes["sampling"] = sampling
    leading = messages_of(model.messages)
    if req.messages is not None and req.messages and (model.system or leading):
        messages = [*leading, *req.messages]
        if model.system and req.messages[0].role != "system":
            messages.insert(0, Message("system", model.system))
        changes["messages"] = messages
    elif req.prompt is not None and req.prompt.prompt and not req.prompt.raw and not req.prompt.suffix:
        p = req.prompt
        system = p.system or model.system
        if leading:
            head = [Message("system", system)] if system else []
            changes["prompt"] = None
            changes["messages"] = [*head, *leading, Message("user", p.prompt, images=list(p.images))]
        elif system != p.system:
            changes["prompt"] = dataclasses.replace(p, system=system)
    # The accepted message no longer says what is asked (backends/remote forwards it).
    return dataclasses.replace(req, **changes, accepted=None) if changes else req


def with_settings(show: ModelShow, model: StoredModel) -> ModelShow:
    """``show`` with what a managed model holds (``/api/show``'s system, parameters, messages, license)."""
    changes: dict[str, Any] = {
        "system": model.system,
        "parameters": sampling_of(model.parameters),
        "messages": messages_of(model.messages),
        "parent_model": str(model.source.get("from", "")),
    }
    if model.license:
        changes["license"] = "\n\n".join(model.license)
    if model.quantization:
        changes["info"] = dataclasses.replace(
            show.info, details=dataclasses.replace(show.info.details, quantization_level=model.quantization.upper()))
    return dataclasses.replace(show, **changes)
