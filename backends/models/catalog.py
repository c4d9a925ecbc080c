"""What a name given to ``pull`` means: a Hugging Face repo and a revision.

Three forms (Ollama's and the hub clients'):

* ``hf.co/{owner}/{repo}[:{tag}]`` (also ``huggingface.co/...``): Ollama's
  form for Hugging Face pulls;
* ``{owner}/{repo}[:{tag}]``: a plain hub repo id, unless the catalog has
  that name;
* a name from the catalog (``llama3.2:1b``): Ollama's library names mapped to
  MLX repos, shipped with mlxgate (``catalog.toml``) plus the user's
  ``[catalog]`` entries, which win.

The tag is the repo's revision (a branch, tag or commit); none, or
``latest``, is ``main``.  The model is listed under the name it was pulled
with (``latest`` left off, as everywhere in mlxgate).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Mapping

from backends.errors import InvalidArgument, ModelNotFound
from backends.models.names import check_name, store_key
from mlxgate.limits import clip_name
from mlxgate.names import DEFAULT_TAG

#: Ollama's hosts for Hugging Face repos.
HF_HOSTS = ("hf.co", "huggingface.co")
DEFAULT_REVISION = "main"
_SHIPPED = "catalog.toml"


@dataclass(frozen=True)
class Source:
    """Where a pulled model comes from, and the name it is listed under."""

    name: str
    repo: str
    revision: str


def _split_tag(name: str) -> tuple[str, str]:
    base, sep, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    return (base, tag) if sep else (name, "")


def _revision(tag: str) -> str:
    return DEFAULT_REVISION if not tag or tag == DEFAULT_TAG else tag


def parse_target(value: str, where: str) -> tuple[str, str]:
    """``owner/repo[:revision]`` -> (repo, revision); ValueError naming ``where``."""
    try:
        check_name(value, where)
    except InvalidArgument as e:
        raise ValueError(e.message) from None
    base, tag = _split_tag(value)
    if base.count("/") != 1:
        raise ValueError(f"{where}: {value!r} is not a Hugging Face repo id (owner/repo[:revision])")
    return base, _revision(tag)


def shipped_entries() -> dict[str, str]:
    """The catalog shipped with mlxgate."""
    data = tomllib.loads(resources.files(__package__).joinpath(_SHIPPED).read_text(encoding="utf-8"))
    return dict(data.get("models", {}))


class Catalog:
    """Names -> (repo, revision); built once at start-up (bad entries fail there)."""

    def __init__(self, user: Mapping[str, str] = (), shipped: Mapping[str, str] | None = None) -> None:
        entries = dict(shipped_entries() if shipped is None else shipped)
        entries.update(dict(user))
        self._targets: dict[str, tuple[str, str]] = {}
        for name, target in entries.items():
            where = f"catalog entry {name!r}"
            try:
                check_name(name, where)
            except InvalidArgument as e:
                raise ValueError(e.message) from None
            self._targets[store_key(name)] = parse_target(target, where)

    def names(self) -> list[str]:
        return sorted(self._targets)

    def resolve(self, raw: str) -> Source:
        """The repo and revision ``raw`` names, or InvalidArgument / ModelNotFound saying why not."""
        name = check_name(raw)
        base, tag = _split_tag(name)
        host, _, rest = base.partition("/")
        if host.lower() in HF_HOSTS:
            if rest.count("/") != 1:
                raise InvalidArgument(f"model {clip_name(raw)!r}: expected hf.co/<owner>/<repo>[:<revision>]")
            return Source(name, rest, _revision(tag))
        found = self._targets.get(store_key(name))
        if found is not None:
            return Source(name, *found)
        if base.count("/") == 1:
            return Source(name, base, _revision(tag))
        if base.count("/") > 1:
            raise InvalidArgument(
                f"model {clip_name(raw)!r}: only Hugging Face repos can be pulled "
                "(hf.co/<owner>/<repo>[:<revision>] or <owner>/<repo>[:<revision>])"
            )
        raise ModelNotFound(
            f"model {clip_name(raw)!r} not found in mlxgate's catalog of Ollama names; pull a Hugging Face repo "
            "instead (hf.co/<owner>/<repo>, e.g. hf.co/mlx-community/Llama-3.2-1B-Instruct-4bit) or add the name "
            "to the [catalog] table of the config file"
        )
