"""``CreateModelRequest`` -> ``CreateSpec``: the create request checked and converted in one step."""

from __future__ import annotations

from backends import accept
from backends.models.manage import CreateSpec
from mlxgate.v1 import inference_pb2 as pb


def create_spec(m: pb.CreateModelRequest) -> CreateSpec:
    parameters = accept.sampling(m.parameters)
    messages = [accept.message(x, f"messages[{i}]") for i, x in enumerate(m.messages)]
    return CreateSpec(
        model=m.model,
        from_model=m.from_model,
        files=dict(m.files),
        adapters=dict(m.adapters),
        template=m.template if m.HasField("template") else None,
        license=list(m.license),
        system=m.system if m.HasField("system") else None,
        parameters=parameters,
        messages=messages,
        quantize=m.quantize,
    )
