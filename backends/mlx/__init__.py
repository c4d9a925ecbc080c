"""The MLX engine: local generation and embeddings with mlx-lm.

``MLXBackend`` is imported lazily so ``backends.mlx.testmodel`` (used by the
CLI and tests) does not pull in the engine.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MLXBackend"]


def __getattr__(name: str) -> Any:
    if name == "MLXBackend":
        from backends.mlx.backend import MLXBackend

        return MLXBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
