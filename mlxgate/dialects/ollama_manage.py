"""Ollama's model-management requests (docs/api.md: create, copy, delete, blobs, push), declared once.

Kept beside ``mlxgate/dialects/ollama.py`` (generation, listing, show) as its
model-management part; ``gateway/ollama/manage.py`` parses with these models
and renders ``Progress``.  ``parameters`` are Ollama's options (a
Modelfile's ``PARAMETER`` lines) with the contract's ranges.
"""

from __future__ import annotations

from typing import Optional, Union

from pydantic import Field
from typing_extensions import Annotated, NotRequired, TypedDict

from mlxgate import limits
from mlxgate.dialects.base import Limit, ModelName, WireModel, ignored
from mlxgate.dialects.ollama import Message, Options

#: File name in the model folder -> "sha256:<hex>" of an uploaded blob.
Files = dict[str, str]


class CreateRequest(WireModel):
    """POST /api/create (Ollama's current API; a Modelfile is parsed by the client)."""

    model: Optional[ModelName] = None
    name: Optional[ModelName] = Field(None, description="deprecated: use model", json_schema_extra={"deprecated": True})
    from_: Optional[ModelName] = Field(None, alias="from", description="an existing model to build on")
    files: Optional[Files] = Field(None, description="uploaded blobs making an MLX model folder: "
                                                     "file name -> sha256:<hex>")
    adapters: Optional[Files] = Field(None, description="mlx-lm LoRA adapter files (adapters.safetensors, "
                                                        "adapter_config.json) -> sha256:<hex>")
    template: Optional[str] = Field(None, description="a Jinja chat template (Go templates are refused)")
    license: Optional[Union[str, list[str]]] = None
    system: Optional[str] = None
    parameters: Optional[Options] = None
    messages: Optional[Annotated[list[Message], Limit(maxItems=limits.MAX_MESSAGES)]] = None
    quantize: Optional[str] = Field(None, description="q4_K_M, q4_K_S, q4_0, q4_1 (4-bit), q8_0 (8-bit), "
                                                      "mxfp4, nvfp4, mxfp8")
    stream: Optional[bool] = Field(None, description="default true: NDJSON progress lines")
    modelfile: Optional[ignored({"type": "string", "deprecated": True})] = None
    quantization: Optional[ignored({"type": "string", "deprecated": True})] = None

    def licenses(self) -> list[str]:
        return [self.license] if isinstance(self.license, str) else list(self.license or ())


class CopyRequest(WireModel):
    """POST /api/copy."""

    source: ModelName
    destination: ModelName


class DeleteRequest(WireModel):
    """DELETE /api/delete."""

    model: Optional[ModelName] = None
    name: Optional[ModelName] = Field(None, description="deprecated: use model", json_schema_extra={"deprecated": True})


class Progress(TypedDict):
    """A line of create's progress ("using existing layer sha256:...", "writing manifest", "success")."""

    status: str
    digest: NotRequired[str]
    total: NotRequired[int]
    completed: NotRequired[int]
