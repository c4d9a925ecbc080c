"""Full-stack fixture: HTTP front -> real gRPC service -> MLX engine on the test model.

Registered as a pytest plugin in tests/conftest.py.  ``stack`` is session
scoped: one gRPC service on port 0 over the session's ``mlx_backend``, one
front on port 0 pointed at it.  The service is given the router over the MLX
backend and a puller over its store, as ``mlxgate serve`` composes them (the
hub an empty fake: pulls end in 404).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from backends.models.catalog import Catalog
from backends.models.hub import HubClient
from backends.models.pull import Puller
from backends.routing import Router
from backends.service import RunningService, start_inference_service
from gateway.app import RunningHTTP, create_app, start_http
from mlxgate.config import HubConfig, ServerConfig
from tests.fakes.hf_hub_fake import FakeHub

#: The model the generated test model is served as (tests/mlx_fixtures.py).
MODEL = "tiny-llama"


@dataclass
class StackInfo:
    base: str  # http://127.0.0.1:<port>
    grpc_target: str
    backend: Any  # the MLX backend (active_count for cancellation tests)
    model: str
    server_cfg: ServerConfig
    service: RunningService
    http: RunningHTTP


@pytest.fixture(scope="session")
async def stack(mlx_backend, tmp_path_factory) -> Any:
    router = Router([mlx_backend])
    # Pulls go to a fake hub with no repos: every pull is a 404 before any
    # download, so nothing is ever added to the session's models.
    hub = await FakeHub().start()
    hub_cfg = HubConfig(endpoint=hub.base)
    puller = Puller(mlx_backend.registry.store, HubClient(hub_cfg), Catalog(), hub_cfg)
    service = await start_inference_service(router, port=0, puller=puller)
    # The data folder (the Responses API's store) under the session's tmp dir, never the user's.
    cfg = ServerConfig(host="127.0.0.1", port=0, request_timeout=120.0, max_body_bytes=1024 * 1024,
                       data_dir=str(tmp_path_factory.mktemp("data")))
    http = await start_http(create_app(cfg, service.target), cfg.host, 0)
    try:
        yield StackInfo(
            base=http.url,
            grpc_target=service.target,
            backend=mlx_backend,
            model=MODEL,
            server_cfg=cfg,
            service=service,
            http=http,
        )
    finally:
        await http.stop()
        await service.stop(grace=1.0)
        await puller.close()
        await hub.stop()
