"""Names a caller gives a model: checked as data, never used as paths.

Ollama's rules (``types/model/name.go``) and the Hugging Face Hub's repo ids
meet here: up to three ``/``-separated parts (``host/namespace/model``, e.g.
``hf.co/mlx-community/Qwen3-4B-4bit``), then an optional ``:tag``.  A part
starts with a letter, a digit or ``_`` and holds letters, digits, ``.``, ``-``
and ``_``; ``..`` never appears; the whole name is at most 256 characters.  So
``../x``, ``/etc/passwd``, ``a\\b``, ``x:../../y`` and control characters are
refused before anything is looked up.  The store never builds a path from a
name anyway (``store.ModelStore.path_of``); these rules keep the names that
reach the listing, logs and metrics printable and bounded.
"""

from __future__ import annotations

import re

from backends.errors import InvalidArgument
from mlxgate.limits import clip_name
from mlxgate.names import untagged

MAX_NAME_CHARS = 256
_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(rf"(?:{_PART}/){{0,2}}{_PART}(?::{_TAG})?")


def check_name(name: str, field: str = "model") -> str:
    """``name`` as the store keys it (no ``:latest``), or InvalidArgument naming ``field``."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{field} is required")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{field} is longer than {MAX_NAME_CHARS} characters")
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"{field} {clip_name(name)!r} is not a valid model name: up to three '/'-separated parts of "
            "letters, digits, '.', '-' and '_' (not starting with '.' or '-', no '..'), then an optional ':tag'"
        )
    return untagged(name)


def store_key(name: str) -> str:
    """The case-insensitive key of a checked name (Ollama compares names that way)."""
    return untagged(name).lower()
