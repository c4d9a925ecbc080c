"""Fixtures for the MLX engine: the generated test model and a backend serving it.

Written once per session; the gRPC and gateway tests reuse them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.mlx.testmodel import write_test_model
from mlxgate.config import MLXConfig

TEST_MODEL = "tiny-llama"


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory) -> Path:
    """A models_dir holding one generated model, ``tiny-llama``."""
    root = tmp_path_factory.mktemp("mlx-models")
    write_test_model(root, TEST_MODEL, seed=0)
    return root


@pytest.fixture(scope="session")
def mlx_config(test_model_dir) -> MLXConfig:
    return MLXConfig(
        models_dir=str(test_model_dir),
        hf_cache=str(test_model_dir / "no-hf-cache"),
        max_loaded_models=2,
        default_max_tokens=32,
        bootstrap_test_model=False,
    )


@pytest.fixture(scope="session")
async def mlx_backend(mlx_config):
    """An MLXBackend over ``test_model_dir``; closed at the end of the session."""
    from backends.mlx.backend import MLXBackend

    backend = MLXBackend(mlx_config)
    yield backend
    await backend.close()
