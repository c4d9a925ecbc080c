"""Copy, delete and create managed models: what the model-management RPCs do.

``ModelManagement`` works on the MLX registry's store (``registry.store``)
and is built by the composition root beside the MLX backend; the service's
handlers call it (``backends.servicer``).  Every change is serialised by one
lock, runs its file work in a worker thread, rescans the registry and calls
``changed`` (the router drops its cached model lists).

Decisions:

- **copy** of a managed name adds a manifest row pointing at the same
  snapshot (no bytes copied).  A copy of a folder the user placed in the
  models directory, or of a Hugging Face cache entry, becomes a new snapshot
  whose files are **hard links** to the user's files (a symbolic link to the
  resolved file where the two are on different file systems): nothing of the
  user's is moved, and deleting the managed name removes only the links.
- **delete** removes managed names only.  A folder the user placed is never
  deleted here: that is a 400 saying so.  A model created from the deleted
  one refers to the snapshot, not to the name, so it keeps working.
- **create** from a model reuses its snapshot (or links a user's folder as
  copy does), inherits its settings and lays the new ones over them; from
  ``files`` (uploaded blobs) it hard-links the blobs into ``partial/``,
  checks that they make an MLX model and promotes the folder whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

from backends.errors import InvalidArgument, ModelNotFound
from backends.mlx.registry import ModelEntry, ModelRegistry, has_weights
from backends.models import quantize as quant
from backends.models.blobs import blob_size
from backends.models.names import MAX_NAME_CHARS, check_name
from backends.models.settings import parameters_of
from backends.models.store import ModelStore, StoredModel, check_member
from backends.types import Message, Sampling
from mlxgate.limits import MAX_MESSAGES, clip_name

log = logging.getLogger(__name__)

#: Files that are code or pickles: never part of a model made here.
_REFUSED_SUFFIXES = (".py", ".pkl", ".pickle", ".bin", ".pt", ".pth", ".gguf", ".so", ".dylib")
#: Files a LoRA adapter folder of mlx-lm's fine-tuning holds.
ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
_MAX_FILES = 4096
_MAX_LICENSE_CHARS = 1024 * 1024


@dataclasses.dataclass
class Progress:
    """One line of create's progress (Ollama's ``ProgressResponse``)."""

    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0


@dataclasses.dataclass
class CreateSpec:
    """A checked create request (``CreateModelRequest`` as the service read it)."""

    model: str
    from_model: str = ""
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)
    template: Optional[str] = None
    license: list[str] = dataclasses.field(default_factory=list)
    system: Optional[str] = None
    parameters: Sampling = dataclasses.field(default_factory=Sampling)
    messages: list[Message] = dataclasses.field(default_factory=list)
    quantize: str = ""


def _layer(data: object) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _check_source_name(name: str, field: str) -> str:
    """A name that is looked up, never stored (a folder's name may be any): bounded, printable."""
    if not name:
        raise InvalidArgument(f"{field} is required")
    if len(name) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name):
        raise InvalidArgument(f"{field} {clip_name(name)!r} is not a valid model name")
    return name


def check_template(template: str) -> None:
    """A chat template must be Jinja (what MLX models carry); Ollama's Go templates are refused."""
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidArgument(
            f"template: not a Jinja chat template ({e.message}, line {e.lineno}); mlxgate's models use "
            "Jinja chat templates (tokenizer_config.json's chat_template), not Ollama's Go templates"
        ) from None


class ModelManagement:
    """Copy, delete, create and blobs over one registry's store."""

    def __init__(self, registry: ModelRegistry, changed: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.store: ModelStore = registry.store
        self.changed = changed
        self._lock = asyncio.Lock()
        #: store key -> manifest, for the accept step's O(1) look-up.
        self._settings: dict[str, StoredModel] = {}
        self._settings_loaded = False

    # ---------------------------------------------------------------- settings

    def _reload(self) -> None:
        self._settings = {m.name.lower(): m for m in self.store.all()}
        self._settings_loaded = True

    async def start(self) -> None:
        await asyncio.to_thread(self._reload)

    def settings(self, name: str) -> Optional[StoredModel]:
        """The manifest of a managed name (cached; no I/O), or None."""
        if not self._settings:
            return None
        from mlxgate.names import untagged

        return self._settings.get(untagged(name.lower()))

    def refresh(self) -> None:
        """After any change to the store (this object's, or a pull's): reread the
        settings, rescan the registry, tell the listener."""
        self._reload()
        self.registry.forget()
        try:
            self.changed()
        except Exception:  # noqa: BLE001 - a listener's failure never undoes a change
            log.exception("model change listener failed")

    # ---------------------------------------------------------------- copy, delete

    async def copy(self, source: str, destination: str) -> str:
        _check_source_name(source, "source")
        dst = check_name(destination, "destination")
        async with self._lock:
            await asyncio.to_thread(self._copy, source, dst)
            self.refresh()
        log.info("copied model %s to %s", source, dst)
        return dst

    def _copy(self, source: str, dst: str) -> None:
        entry = self.registry.resolve(source)
        if entry.stored is not None:
            model = dataclasses.replace(entry.stored, name=dst, created_at=time.time())
        else:
            snapshot = self._link_folder(entry)
            model = StoredModel(dst, snapshot, source={"copy_of": entry.name, "origin": entry.source})
        self.store.put(model)

    async def delete(self, name: str) -> str:
        _check_source_name(name, "model")
        async with self._lock:
            removed = await asyncio.to_thread(self._delete, name)
            self.refresh()
        log.info("deleted model %s", removed)
        return removed

    def _delete(self, name: str) -> str:
        if self.store.get(name) is None:
            try:
                entry = self.registry.resolve(name)
            except ModelNotFound:
                raise ModelNotFound(f"model '{clip_name(name)}' not found") from None
            if entry.source != "store":
                where = "a folder in the models directory" if entry.source == "dir" else "a Hugging Face cache entry"
                raise InvalidArgument(
                    f"model '{clip_name(name)}' is {where} ({entry.path}), not a model mlxgate manages; "
                    "mlxgate never deletes it: remove it yourself"
                )
        return self.store.remove(name).name

    # ---------------------------------------------------------------- blobs

    def has_blob(self, digest: str) -> Optional[int]:
        return blob_size(self.store, digest)

    # ---------------------------------------------------------------- create

    async def create(self, spec: CreateSpec) -> AsyncIterator[Progress]:
        name = check_name(spec.model, "model")
        self._check_spec(spec)
        async with self._lock:
            base: Optional[ModelEntry] = None
            if spec.files:
                for rel, digest in spec.files.items():
                    yield Progress(f"using existing layer {digest}")
                snapshot = await asyncio.to_thread(self._folder_from_blobs, spec.files, "files", _is_model)
            else:
                base = await asyncio.to_thread(self.registry.resolve, spec.from_model)
                snapshot = (
                    base.stored.snapshot if base.stored is not None
                    else await asyncio.to_thread(self._link_folder, base)
                )
                yield Progress(f"using existing layer {_layer(snapshot)}")
            inherited = base.stored if base is not None and base.stored is not None else None
            model = self._manifest(name, snapshot, spec, base, inherited)
            if spec.adapters:
                yield Progress(f"using existing layer {_layer(sorted(spec.adapters.values()))}")
                model.adapters = [await asyncio.to_thread(
                    self._folder_from_blobs, spec.adapters, "adapter", _is_adapter)]
            for what, value in (("system", model.system), ("template", model.template),
                                ("params", model.parameters), ("messages", model.messages),
                                ("license", model.license)):
                if value:
                    yield Progress(f"creating new layer {_layer({what: value})}")
            if spec.quantize:
                async for p in quant.quantize(self.store, model, spec.quantize):
                    yield p
            yield Progress("writing manifest")
            await asyncio.to_thread(self.store.put, model)
            self.refresh()
        log.info("created model %s", name)
        yield Progress("success")

    @staticmethod
    def _check_spec(spec: CreateSpec) -> None:
        if spec.files and spec.from_model:
            raise InvalidArgument("give either from (an existing model) or files (uploaded blobs), not both")
        if not spec.files and not spec.from_model:
            raise InvalidArgument("from or files is required: the model to build on, or its uploaded files")
        if spec.from_model:
            _check_source_name(spec.from_model, "from")
        for field, files in (("files", spec.files), ("adapters", spec.adapters)):
            if len(files) > _MAX_FILES:
                raise InvalidArgument(f"{field}: more than {_MAX_FILES} files")
            for rel, digest in files.items():
                check_member(rel)
                if rel.lower().endswith(_REFUSED_SUFFIXES):
                    raise InvalidArgument(f"{field}: {clip_name(rel)!r} is code, a pickle or GGUF; an MLX model "
                                          "takes config.json, *.safetensors and tokenizer files")
        if spec.template:
            check_template(spec.template)
        if len(spec.messages) > MAX_MESSAGES:
            raise InvalidArgument(f"messages: more than {MAX_MESSAGES}")
        if sum(len(x) for x in spec.license) > _MAX_LICENSE_CHARS:
            raise InvalidArgument(f"license: longer than {_MAX_LICENSE_CHARS} characters")
        if spec.quantize:
            quant.plan(spec.quantize)  # an unknown type is refused before any work

    @staticmethod
    def _manifest(name: str, snapshot: str, spec: CreateSpec, base: Optional[ModelEntry],
                  inherited: Optional[StoredModel]) -> StoredModel:
        model = (
            dataclasses.replace(inherited, name=name, created_at=time.time())
            if inherited is not None else StoredModel(name, snapshot)
        )
        model.snapshot = snapshot
        model.source = {"from": base.name} if base is not None else {"files": dict(spec.files)}
        if spec.system is not None:
            model.system = spec.system
        if spec.template is not None:
            model.template = spec.template
        params = parameters_of(spec.parameters)
        if params:
            model.parameters = {**model.parameters, **params}
        if spec.messages:
            model.messages = [{"role": m.role, "content": m.content} for m in spec.messages]
        if spec.license:
            model.license = list(spec.license)
        return model

    # ---------------------------------------------------------------- folders

    def _link_folder(self, entry: ModelEntry) -> str:
        """A snapshot of hard links to the files of a user's model folder."""
        snapshot = f"link-{secrets.token_hex(12)}"
        part = self.store.partial_path(snapshot)
        part.mkdir(parents=True)
        try:
            n = 0
            for path in sorted(entry.path.rglob("*")):
                rel = path.relative_to(entry.path).as_posix()
                if path.is_dir() or any(p.startswith(".") for p in rel.split("/")):
                    continue
                n += 1
                if n > _MAX_FILES:
                    raise InvalidArgument(f"model folder {entry.path} holds more than {_MAX_FILES} files")
                _link(path.resolve(), self.store.member_path(part, rel))
            return self._promote(snapshot)
        except BaseException:
            _remove_tree(part)
            raise

    def _folder_from_blobs(self, files: dict[str, str], kind: str, check: Callable[[Path], None]) -> str:
        """A snapshot of hard links to uploaded blobs under the names given."""
        missing = [d for d in files.values() if blob_size(self.store, d) is None]
        if missing:
            raise InvalidArgument(f"blob {clip_name(missing[0])} not found: upload it first "
                                  "(POST /api/blobs/<digest>)")
        snapshot = f"{kind}-" + hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:40]
        if self.store.snapshot_path(snapshot).is_dir():
            return snapshot
        part = self.store.partial_path(snapshot)
        _remove_tree(part)
        part.mkdir(parents=True)
        try:
            for rel, digest in files.items():
                _link(self.store.blob_path(digest), self.store.member_path(part, rel))
            check(part)
            return self._promote(snapshot)
        except BaseException:
            _remove_tree(part)
            raise

    def _promote(self, snapshot: str) -> str:
        self.store.promote(snapshot)
        return snapshot


def _is_model(folder: Path) -> None:
    if not has_weights(folder):
        raise InvalidArgument("files do not make an MLX model: config.json and *.safetensors weights are needed "
                              "(with the tokenizer files)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"files: config.json is not JSON: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise InvalidArgument("files: config.json has no model_type")


def _is_adapter(folder: Path) -> None:
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise InvalidArgument(f"adapters: {', '.join(missing)} missing (mlx-lm's LoRA adapters: "
                              f"{' and '.join(ADAPTER_FILES)})")


def _link(src: Path, dst: Path) -> None:
    """Hard link (same file system), else a symbolic link to the resolved file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(src, dst)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

