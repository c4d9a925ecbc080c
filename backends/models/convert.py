"""``CreateModelRequest`` -> ``CreateSpec``: the create request checked and converted in one step."""

from __future__ import annotations

from backends import validation
from backends.errors import InvalidArgument
from backends.models.manage import CreateSpec
from backends.types import Message, Sampling
from mlxgate.v1 import inference_pb2 as pb


def create_spec(m: pb.CreateModelRequest) -> CreateSpec:
    validation.check_sampling(m.parameters)
    messages = []
    for i, x in enumerate(m.messages):
        if x.role == pb.ROLE_UNSPECIFIED:
            raise InvalidArgument(f"messages[{i}].role is required")
        messages.append(Message.from_pb(x))
    return CreateSpec(
        model=m.model,
        from_model=m.from_model,
        files=dict(m.files),
        adapters=dict(m.adapters),
        template=m.template if m.HasField("template") else None,
        license=list(m.license),
        system=m.system if m.HasField("system") else None,
        parameters=Sampling.from_pb(m.parameters),
        messages=messages,
        quantize=m.quantize,
    )
