"""What every rank does alike: load its shard, build a sequence's sampler."""

from __future__ import annotations

from typing import Any, Callable

from backends.errors import Unavailable
from backends.mlx import sampling as sampling_mod
from backends.mlx.distributed.channel import group
from backends.mlx.engine import Engine, _greedy
from backends.types import Sampling


def sampling_of(d: dict) -> Sampling:
    return Sampling(**d)


def sampler_for(sampling: Sampling, seed: int, guard_of: Any) -> Callable:
    """The sampler the engine gives a sequence (``Engine._admit``), on any rank."""
    if sampling.temperature == 0:
        return _greedy
    return Engine._guard(guard_of, sampling_mod.make_sampler(sampling, seed), True)


def parameter_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def load_shard(path: str, pipeline: bool):
    """This rank's shard of the model at ``path`` (every rank calls it together)."""
    from mlx_lm.utils import sharded_load

    grp = group()
    if pipeline:
        return sharded_load(path, pipeline_group=grp, tensor_group=None)
    return sharded_load(path, pipeline_group=None, tensor_group=grp)


def check_shardable(path: str, pipeline: bool) -> None:
    """Refuse, on rank 0 alone and before any rank starts loading, a model
    that cannot be split the asked way (the same check ``sharded_load`` makes
    on every rank, which would otherwise fail there one by one)."""
    from pathlib import Path

    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path), lazy=True, strict=False)
    if pipeline:
        if not (hasattr(model, "model") and hasattr(model.model, "pipeline")):
            raise Unavailable(f"{Path(path).name}: this model type does not support pipeline parallelism "
                              "(run without --pipeline: tensor parallelism)")
        if not (Path(path) / "model.safetensors.index.json").exists():
            raise Unavailable(f"{Path(path).name}: pipeline loading needs model.safetensors.index.json")
    elif not hasattr(model, "shard"):
        raise Unavailable(f"{Path(path).name}: this model type does not support tensor parallelism "
                          "(try --pipeline)")
