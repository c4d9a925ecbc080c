"""Who may manage models: the one list of model-management gRPC methods and HTTP routes.

Without any key configured, everything is open (Ollama on loopback).  With
keys set, listing, showing and inference need any configured key, and the
operations below need an **admin key** (``server.admin_keys``, its
variable or ``--admin-key``).  The gRPC gate
(``backends/gate.py``) checks the methods, the HTTP trust guard
(``gateway/security.py``) the routes; both read them from here, so a new
management operation is added once.  Admin keys are keys too: they are valid
for everything a plain key may do.
"""

from __future__ import annotations

from mlxgate.config import env_var

#: InferenceService methods that change what models exist.
ADMIN_METHODS = frozenset({"PullModel", "CreateModel", "CopyModel", "DeleteModel", "CreateBlob", "HasBlob"})

#: HTTP paths (any method) of the same operations; push is refused (501) but
#: still needs an admin key, as Ollama's management routes do.
ADMIN_PATHS = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
ADMIN_PREFIXES = ("/api/blobs/",)

#: What a non-admin key is told (403 / PERMISSION_DENIED).
NEEDS_ADMIN = (
    "forbidden: managing models (pull, create, copy, delete, blobs, push) needs an admin key "
    f"({env_var('server.admin_keys')} or --admin-key)"
)

#: What a non-admin key asking for ``/api/usage`` (``GetUsage``) is told.
USAGE_NEEDS_ADMIN = f"usage is shown to admin keys only ([[keys]] admin = true, or {env_var('server.admin_keys')})"


def is_admin_method(method: str) -> bool:
    """``method``: the bare name ("CopyModel") or the full gRPC path."""
    return method.rpartition("/")[2] in ADMIN_METHODS


def is_admin_path(path: str) -> bool:
    return path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES)
