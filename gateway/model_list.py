"""The model list as the front reads it: finding a listed model by the name a
request used."""

from __future__ import annotations

from typing import Iterable, Optional

from mlxgate.names import same_model
from mlxgate.v1 import inference_pb2 as pb


def find_model(models: Iterable[pb.ModelInfo], name: str) -> Optional[pb.ModelInfo]:
    """The listed model called ``name``: that exact name first, else one it
    names Ollama-style (``x:latest`` finds ``x``)."""
    models = list(models)
    return next((m for m in models if m.name == name), None) or next(
        (m for m in models if same_model(m.name, name)), None)
