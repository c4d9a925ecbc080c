"""Model names and their Ollama tags.

Ollama names a model ``name:tag`` (``llama3.2:latest``, ``qwen3:8b``) and its
clients compare names in that form: ``ollama list``, LangChain's
``validate_model_on_init``, Open WebUI.  mlxgate's own names have no tag (an MLX
model folder ``tiny-llama``, a Hugging Face cache entry ``org/name``, a cloud
model id), so the Ollama dialect shows them with ``:latest``.  A tag is what
follows the last ``:`` *after the last* ``/`` (``org/name:q4`` has one; a host
with a port such as ``host:5000/name`` does not).

Everywhere a name is looked up, ``x`` and ``x:latest`` are the same model.
"""

from __future__ import annotations

DEFAULT_TAG = "latest"
_LATEST = f":{DEFAULT_TAG}"


def has_tag(name: str) -> bool:
    return ":" in name.rsplit("/", 1)[-1]


def tagged(name: str) -> str:
    """The Ollama form: ``x`` -> ``x:latest``; a name with a tag is kept."""
    return name if not name or has_tag(name) else name + _LATEST


def untagged(name: str) -> str:
    """The lookup key: ``x:latest`` -> ``x`` (other tags are part of the name)."""
    return name[: -len(_LATEST)] if name.endswith(_LATEST) and has_tag(name) else name


def same_model(a: str, b: str) -> bool:
    return untagged(a) == untagged(b)
