"""Build the configured backends, in priority order, and the router over them.

Part of the composition root: each backend is handed only its own section of
the configuration (``MLXBackend(config.mlx)``, ``OllamaBackend(config.ollama)``,
``cloud_backend(provider, env)`` -- a ``CloudBackend`` or an ``AnthropicBackend``
by the provider's kind --, ``Router(backends, config.router, config.aliases)``).

Order: MLX (when ``config.mlx.enabled``), one remote mlxgate service per
``config.remotes`` entry (in the order configured), the upstream Ollama (when
``config.ollama.upstream`` is set), then one cloud backend per
``config.cloud.providers`` entry (OpenAI-compatible or Anthropic, by its
``kind``), in the order configured.  MLX and the remotes are the engines the
router places by warmth and load (``backends/routing/placement.py``); the
others keep this order.  MLX is imported lazily so a process without it
(front only, or MLX disabled) never loads it.

A remote's key: its ``key_env`` variable, else its ``key``, else the front's
own first API key (``server.api_keys``), so a fleet sharing one key needs it
set once.

``build_puller``: what pulls models (``backends/models/pull.py``) into the
MLX engine's store, with the catalog and the ``[hub]`` section; ``build_model_management``:
copy, delete, create and blobs (``backends/models/manage.py``) over the same store.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

from backends.base import Backend
from backends.cloud import cloud_backend
from backends.models.catalog import Catalog
from backends.models.hub import HubClient
from backends.models.manage import ModelManagement
from backends.models.pull import PullObserver, Puller
from backends.ollama import OllamaBackend
from backends.remote import RemoteBackend
from backends.routing import BudgetGuard, Router, RouterObserver
from mlxgate.config import Config, MLXConfig
from mlxgate.keyring import first

log = logging.getLogger(__name__)


def _mlx_backend(config: MLXConfig) -> Optional[Backend]:
    try:
        from backends.mlx import MLXBackend
    except ImportError:
        # The gateway still serves what Ollama and the cloud providers have.
        log.exception("MLX engine could not be imported; running without it")
        return None
    return MLXBackend(config)


def build_backends(config: Config, env: Mapping[str, str]) -> list[Backend]:
    backends: list[Backend] = []
    if config.mlx.enabled:
        mlx = _mlx_backend(config.mlx)
        if mlx is not None:
            backends.append(mlx)
    shared_key = first(config.server.api_keys)
    for remote in config.remotes:
        backends.append(RemoteBackend(remote, env, shared_key=shared_key,
                                      max_message_bytes=config.server.grpc_max_message_bytes,
                                      tls_ca=config.server.grpc_tls_ca))
    if config.ollama.upstream:
        backends.append(OllamaBackend(config.ollama))
    seen = set()
    for provider in config.cloud.providers:
        if provider.name in seen:
            raise ValueError(f"cloud provider {provider.name!r} is configured twice")
        seen.add(provider.name)
        backends.append(cloud_backend(provider, env))
    return backends


def build_puller(config: Config, router: Router, observer: Optional[PullObserver] = None,
                 models: Optional[ModelManagement] = None) -> Optional[Puller]:
    """``pull``'s worker (PullModel, /api/pull) over the MLX engine's store;
    None without the MLX engine (a pulled model would have nothing to run it).
    A finished pull refreshes ``models`` (its settings cache, the registry,
    the router's lists)."""
    registry = getattr(router.mlx_backend, "registry", None)
    if registry is None:
        return None

    def changed() -> None:
        registry.forget()
        router.invalidate_model_lists()

    return Puller(registry.store, HubClient(config.hub), Catalog(config.catalog), config.hub,
                  on_change=models.refresh if models is not None else changed, observer=observer)


def build_model_management(router: Router) -> Optional[ModelManagement]:
    """Copy, delete, create and blobs over the MLX engine's store; None without
    the MLX engine."""
    registry = getattr(router.mlx_backend, "registry", None)
    if registry is None:
        return None
    return ModelManagement(registry, changed=router.invalidate_model_lists)


def build_router(
    config: Config, env: Mapping[str, str], observer: Optional[RouterObserver] = None,
    budgets: Optional[BudgetGuard] = None,
) -> Router:
    return Router(build_backends(config, env), config.router, config.aliases, observer=observer, budgets=budgets)
