"""A fresh machine gets a model to serve, never mixed into the user's own.

When no MLX model is found (the models directory and the Hugging Face
cache), mlxgate serves the small generated test model (``testmodel``: random
weights, so it answers gibberish, but every route works) from
``<data_dir>/test-models/``, writing it there the first time.  It never
writes into the models directory: a user pointing ``mlxgate serve`` at their
own (still empty) folder must not find a random-weight model among their
models later.  Each start that serves it says so in one log line, with where
it is and how to remove it; once a real model is found it is no longer served.

This is the only place the bootstrap happens; ``mlxgate_cli.stack`` calls it
before the MLX backend starts, and ``MLXConfig.test_models_dir`` tells the
registry to scan the folder.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

from backends.mlx.registry import ModelRegistry, has_weights
from mlxgate.config import MLXConfig, env_var

log = logging.getLogger(__name__)

TEST_MODEL_NAME = "tiny-llama"
TEST_MODELS_FOLDER = "test-models"


def ensure_test_model(mlx: MLXConfig, data_dir: Path) -> Optional[Path]:
    """Serve the test model when there is nothing else to serve.

    Returns the model's folder and sets ``mlx.test_models_dir`` when the
    bootstrap applies (MLX enabled, ``bootstrap_test_model`` on, no MLX model
    found); None otherwise.
    """
    if not (mlx.enabled and mlx.bootstrap_test_model):
        return None
    if ModelRegistry(dataclasses.replace(mlx, test_models_dir=None)).scan():
        return None
    folder = data_dir / TEST_MODELS_FOLDER
    model = folder / TEST_MODEL_NAME
    if not has_weights(model):
        from backends.mlx.testmodel import write_test_model

        write_test_model(folder, TEST_MODEL_NAME)
    mlx.test_models_dir = str(folder)
    log.warning(
        "no MLX models found (models directory %s, Hugging Face cache): serving %r, a small generated test "
        "model with random weights (it answers gibberish), from %s; pull a real model (mlxgate pull llama3.2:1b, "
        "or POST /api/pull {\"model\": \"hf.co/mlx-community/Llama-3.2-1B-Instruct-4bit\"}) or put MLX models in "
        f"the models directory (--models-dir, {env_var('mlx.models_dir')}) and it is no longer served; to remove "
        "it: rm -r %s",
        Path(mlx.models_dir).expanduser().absolute(), TEST_MODEL_NAME, model.absolute(), folder.absolute(),
    )
    return model
