"""``mlxgate create NAME -f Modelfile``: the Modelfile read (``modelfile``),
a local model folder's files and adapters uploaded as blobs
(``HEAD /api/blobs/sha256:<hex>``, then ``POST`` when the server lacks it),
then ``POST /api/create`` with ``files`` / ``adapters`` naming them by
``sha256:<hex>``, as Ollama's CLI sends them, its progress drawn."""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

from mlxgate_cli.client import modelfile as mf
from mlxgate_cli.client.api import OllamaAPI
from mlxgate_cli.client.progress import Progress

#: The files of an MLX model folder that go up: the weights and their index,
#: the config, tokenizer and chat template files, the generation config and
#: processor files.  No pickles, no code.
MODEL_FILES = (
    "config.json", "*.safetensors", "*.safetensors.index.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)
#: An adapter folder's files (mlx-lm's ``lora`` writes adapters.safetensors and
#: adapter_config.json; PEFT names its weights adapter_model.safetensors).
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors", "adapter_model.safetensors")


class CreateError(ValueError):
    """A Modelfile whose local paths cannot be sent."""


@dataclass(frozen=True)
class LocalFile:
    """A file to upload: its name in the request, where it is, its digest and size."""

    name: str
    path: Path
    digest: str
    size: int


def sha256_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes, read in chunks."""
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _select(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns))


def model_files(path: Path) -> list[Path]:
    """A FROM path's files: one file as it is, or a folder's model files."""
    if path.is_file():
        return [path]
    files = _select(path, MODEL_FILES)
    if not any(p.name.endswith(".safetensors") for p in files):
        raise CreateError(f"no safetensors files found in {path}")
    return files


def adapter_files(path: Path) -> list[Path]:
    """An ADAPTER path's files: one file as it is, or a folder's adapter files."""
    if path.is_file():
        return [path]
    files = _select(path, ADAPTER_FILES)
    if not any(p.name.endswith(".safetensors") for p in files):
        raise CreateError(f"no adapter weights (adapters.safetensors) found in {path}")
    return files


def local_files(paths: list[Path]) -> list[LocalFile]:
    out = []
    for p in paths:
        try:
            out.append(LocalFile(p.name, p, sha256_digest(p), p.stat().st_size))
        except OSError as e:
            raise CreateError(f"cannot read {p}: {e.strerror or e}") from None
    return out


def read_modelfile(filename: Optional[str]) -> tuple[str, Path]:
    """The Modelfile's text and the folder its paths are relative to: ``-f``,
    else ./Modelfile, else ``FROM .`` (Ollama's defaults)."""
    if filename is None:
        default = Path("Modelfile")
        if not default.is_file():
            return "FROM .\n", Path(".")
        filename = str(default)
    path = Path(filename).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CreateError(f"cannot read the Modelfile {filename}: {e.strerror or e}") from None
    try:
        text = mf.decode(data)
    except UnicodeDecodeError:
        raise CreateError(f"{filename} is not UTF-8 or UTF-16 text") from None
    return text, path.parent


def build_request(name: str, text: str, base: Path, quantize: Optional[str] = None,
                  warn: Optional[TextIO] = None) -> tuple[dict[str, Any], list[LocalFile], list[LocalFile]]:
    """The body of ``POST /api/create`` and the files whose blobs it names
    (the model's, the adapters')."""
    plan = mf.plan(mf.parse(text), base)
    for w in plan.warnings:
        if warn is not None:
            print(w, file=warn)
    files = local_files(model_files(plan.model_path)) if plan.model_path else []
    adapters = local_files([p for a in plan.adapter_paths for p in adapter_files(a)])
    body: dict[str, Any] = {"model": name, **plan.body}
    if files:
        body["files"] = {f.name: f.digest for f in files}
    if adapters:
        body["adapters"] = {f.name: f.digest for f in adapters}
    if quantize:
        body["quantize"] = quantize
    return body, files, adapters


def upload(api: OllamaAPI, blobs: list[LocalFile], progress: Progress) -> None:
    """Each blob the server lacks, sent once."""
    sent: set[str] = set()
    for b in blobs:
        if b.digest in sent:
            continue
        sent.add(b.digest)
        if api.blob_exists(b.digest):
            progress.update({"status": f"using existing blob for {b.name}"})
            continue
        with b.path.open("rb") as f, progress.copying(b.name, b.digest, f, b.size) as reader:
            api.upload_blob(b.digest, reader, b.size)


def create(api: OllamaAPI, name: str, filename: Optional[str], quantize: Optional[str], err: TextIO) -> None:
    text, base = read_modelfile(filename)
    progress = Progress.on(err)
    try:
        body, files, adapters = build_request(name, text, base, quantize, warn=err)
        upload(api, files + adapters, progress)
        for obj in api.stream("/api/create", body):
            progress.update(obj)
    finally:
        progress.close()
