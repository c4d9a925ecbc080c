"""Finding models on disk and describing them without loading them.

Three places hold models: ``MLXConfig.models_dir`` (one model per sub-folder
with a config.json; the folder name is the model name), the models mlxgate
manages itself (pulled, created, copied: ``backends.models.store``, under
``models_dir/.mlxgate-store``; the name is the manifest's) and the Hugging
Face hub cache (``models--org--name/snapshots/<rev>/``; the name is "org/name").
A third, ``MLXConfig.test_models_dir``, is scanned like models_dir when set
(only when nothing else was found: ``backends.mlx.bootstrap``).
Everything here reads small files only (config, tokenizer config, safetensors
headers), so listing stays cheap even with many large models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from backends.errors import ModelNotFound
from backends.models.settings import with_settings
from backends.models.store import STORE_DIRNAME, ModelStore, StoredModel
from backends.mlx.vision.arch import vision_type
from backends.types import ModelDetails, ModelInfo, ModelShow
from mlxgate.config import MLXConfig
from mlxgate.limits import MAX_NAMES_IN_ERROR, clip_name
from mlxgate.names import untagged

log = logging.getLogger(__name__)

BACKEND = "mlx"
#: Fill-in-the-middle token triples (prefix, suffix, middle) of common families.
FIM_CONVENTIONS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"),
)
_DTYPE_NAMES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_RESCAN_AFTER_S = 2.0


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    source: str  # "dir", "store" or "hf"
    #: The manifest of a managed model (its settings, adapters); None otherwise.
    stored: Optional[StoredModel] = field(default=None, compare=False, hash=False)
    #: A managed model's LoRA adapter folder (mlx-lm's ``adapter_path``), applied at load.
    adapter: Optional[Path] = field(default=None, compare=False, hash=False)


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def has_weights(path: Path) -> bool:
    """A model folder: config.json and safetensors weights."""
    return path.is_dir() and (path / "config.json").exists() and bool(_weight_files(path))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: tensor names, dtypes, shapes."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024 * 1024:
                return {}
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return {}


def _format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def context_length_of(config: dict) -> int:
    """The model's context window from its config (text_config for multimodal)."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return 2048


def chat_template_of(path: Path) -> str:
    """The model's default chat template, from tokenizer_config.json or chat_template.jinja."""
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        try:
            return jinja.read_text(encoding="utf-8")
        except OSError:
            pass
    tpl = _read_json(path / "tokenizer_config.json").get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template", "") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), "")
    return tpl if isinstance(tpl, str) else ""


def _vocab_markers(path: Path) -> set[str]:
    """Added (special) tokens, where FIM, tool and thinking markers live."""
    tok = _read_json(path / "tokenizer.json")
    names = {t.get("content", "") for t in tok.get("added_tokens", []) if isinstance(t, dict)}
    cfg = _read_json(path / "tokenizer_config.json")
    for t in (cfg.get("added_tokens_decoder") or {}).values():
        if isinstance(t, dict):
            names.add(t.get("content", ""))
    return names


def fim_tokens_in(vocab: set[str] | dict) -> Optional[tuple[str, str, str]]:
    for triple in FIM_CONVENTIONS:
        if all(t in vocab for t in triple):
            return triple
    return None


class ModelRegistry:
    """Maps names to model folders; rescans when asked for a name it does not know."""

    def __init__(self, config: MLXConfig) -> None:
        self._models_dir = Path(config.models_dir).expanduser()
        self._test_models_dir = Path(config.test_models_dir).expanduser() if config.test_models_dir else None
        hf = Path(config.hf_cache).expanduser() if config.hf_cache else Path.home() / ".cache/huggingface/hub"
        self._hf_cache = hf
        self.store = ModelStore(self._models_dir / STORE_DIRNAME)
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._scanned_at = 0.0

    @property
    def models_dir(self) -> Path:
        return self._models_dir

    # ---------------------------------------------------------------- scanning

    def scan(self) -> list[ModelEntry]:
        entries: dict[str, ModelEntry] = {}
        for entry in self._scan_hf():
            entries[entry.name.lower()] = entry
        # Local folders win over hub entries of the same name, and the
        # models directory over the generated test models.
        if self._test_models_dir is not None:
            for entry in self._scan_dir(self._test_models_dir):
                entries[entry.name.lower()] = entry
        for entry in self._scan_dir(self._models_dir):
            entries[entry.name.lower()] = entry
        # Managed models win over hand-placed folders: their names were given
        # on purpose (pull, create, copy), after the folders were there.
        for entry in self._scan_store():
            entries[entry.name.lower()] = entry
        with self._lock:
            self._entries = entries
            self._scanned_at = time.monotonic()
        return sorted(entries.values(), key=lambda e: e.name.lower())

    @staticmethod
    def _scan_dir(root: Path) -> list[ModelEntry]:
        if not root.is_dir():
            return []
        return [ModelEntry(sub.name, sub, "dir") for sub in sorted(root.iterdir()) if has_weights(sub)]

    def _scan_store(self) -> list[ModelEntry]:
        out = []
        for m in self.store.all():
            path = self.store.snapshot_path(m.snapshot)
            adapter = self.store.snapshot_path(m.adapters[0]) if m.adapters else None
            if has_weights(path) and (adapter is None or adapter.is_dir()):
                out.append(ModelEntry(m.name, path, "store", m, adapter))
            else:
                log.warning("managed model %s: snapshot %s missing or incomplete; not listed", m.name, m.snapshot)
        return out

    def forget(self) -> None:
        """Rescan on the next look-up (after a pull, copy, create or delete)."""
        with self._lock:
            self._scanned_at = 0.0

    def _scan_hf(self) -> list[ModelEntry]:
        root = self._hf_cache
        if not root.is_dir():
            return []
        out = []
        for repo in sorted(root.glob("models--*")):
            parts = repo.name.split("--")[1:]
            if len(parts) < 2:
                continue
            snap = self._hf_snapshot(repo)
            if snap is not None and (snap / "config.json").exists() and _weight_files(snap):
                out.append(ModelEntry("/".join([parts[0], "--".join(parts[1:])]), snap, "hf"))
        return out

    @staticmethod
    def _hf_snapshot(repo: Path) -> Optional[Path]:
        ref = repo / "refs" / "main"
        if ref.exists():
            try:
                snap = repo / "snapshots" / ref.read_text().strip()
                if snap.is_dir():
                    return snap
            except OSError:
                pass
        snaps = [p for p in (repo / "snapshots").glob("*") if p.is_dir()]
        return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            fresh = time.monotonic() - self._scanned_at < _RESCAN_AFTER_S
            cached = sorted(self._entries.values(), key=lambda e: e.name.lower())
        return cached if fresh else self.scan()

    def resolve(self, name: str) -> ModelEntry:
        """Case-insensitive, with an optional ":latest" (Ollama clients send it)."""
        keys = list(dict.fromkeys((name.lower(), untagged(name.lower()))))
        for attempt in range(2):
            if attempt:
                self.scan()
            else:
                self.entries()
            with self._lock:
                for key in keys:
                    if key in self._entries:
                        return self._entries[key]
        names = [e.name for e in self.entries()]
        if names:
            shown = ", ".join(names[:MAX_NAMES_IN_ERROR]) + (", ..." if len(names) > MAX_NAMES_IN_ERROR else "")
            raise ModelNotFound(f"model {clip_name(name)!r} not found in MLX models; available: {shown}")
        raise ModelNotFound(f"model {clip_name(name)!r} not found: no MLX models in {self._models_dir}")

    # ---------------------------------------------------------------- describing

    def config(self, entry: ModelEntry) -> dict:
        return _read_json(entry.path / "config.json")

    def takes_images(self, entry: ModelEntry) -> bool:
        """A vision-language model mlx-vlm can run (``backends/mlx/vision/arch.py``)."""
        return vision_type(self.config(entry)) is not None

    def info(self, entry: ModelEntry) -> ModelInfo:
        config = _read_json(entry.path / "config.json")
        weights = _weight_files(entry.path)
        files = [entry.path / "config.json", *weights]
        sizes = []
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            sizes.append((f.name, st.st_size, st.st_mtime))
        digest = hashlib.sha256()
        digest.update((entry.path / "config.json").read_bytes() if (entry.path / "config.json").exists() else b"")
        for name, size, _ in sizes:
            digest.update(f"{name}:{size}\n".encode())
        modified = max((m for _, _, m in sizes), default=0.0)
        return ModelInfo(
            name=entry.name,
            backend=BACKEND,
            size_bytes=sum(s for f, s, _ in sizes if f.endswith(".safetensors")),
            digest=digest.hexdigest(),
            modified_at=datetime.fromtimestamp(modified, tz=timezone.utc) if modified else None,
            details=self.details(entry, config, weights),
        )

    def details(self, entry: ModelEntry, config: Optional[dict] = None, weights=None) -> ModelDetails:
        config = config if config is not None else _read_json(entry.path / "config.json")
        weights = weights if weights is not None else _weight_files(entry.path)
        quant = config.get("quantization") or config.get("quantization_config") or {}
        bits = quant.get("bits") if isinstance(quant, dict) else None
        count, dtypes = 0, {}
        for w in weights:
            header = _safetensors_header(w)
            tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
            for name, t in tensors.items():
                if name.endswith((".scales", ".biases")):
                    continue
                shape = t.get("shape", [])
                n = 1
                for d in shape:
                    n *= d
                if t.get("dtype") == "U32" and bits and name[: -len(".weight")] + ".scales" in tensors:
                    n = n * 32 // bits  # packed quantized weight
                count += n
                dt = _DTYPE_NAMES.get(t.get("dtype", ""))
                if dt:
                    dtypes[dt] = dtypes.get(dt, 0) + n
        if bits:
            mode = quant.get("mode", "affine") if isinstance(quant, dict) else "affine"
            level = f"Q{bits}" if mode in (None, "affine") else str(mode).upper()
        elif dtypes:
            level = max(dtypes, key=dtypes.get)
        else:
            level = _DTYPE_NAMES.get(str(config.get("torch_dtype") or config.get("dtype") or ""), "")
        family = str(config.get("model_type", ""))
        families = [family] if family else []
        text_family = str((config.get("text_config") or {}).get("model_type") or "")
        if text_family and text_family != family:
            families.append(text_family)  # a VLM's language model
        return ModelDetails(
            family=family,
            families=families,
            parameter_count=count,
            parameter_size=_format_count(count) if count else "",
            quantization_level=level,
            format="mlx",
        )

    def show(self, entry: ModelEntry) -> ModelShow:
        config = _read_json(entry.path / "config.json")
        template = chat_template_of(entry.path)
        if entry.stored is not None and entry.stored.template:
            template = entry.stored.template
        markers = _vocab_markers(entry.path)
        tok_cfg = _read_json(entry.path / "tokenizer_config.json")
        caps = ["completion"]
        if "tools" in template or tok_cfg.get("tool_parser_type"):
            caps.append("tools")
        vision = vision_type(config) is not None
        if not vision and (config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")):
            caps.append("embedding")  # (a VLM's text view has no hidden-state module to embed with)
        if fim_tokens_in(markers):
            caps.append("insert")
        if "<think>" in markers:
            caps.append("thinking")
        if vision:
            caps.append("vision")
        license_text = ""
        for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
            if (entry.path / name).exists():
                try:
                    license_text = (entry.path / name).read_text(encoding="utf-8", errors="replace")
                except OSError:
                    pass
                break
        show = ModelShow(
            info=self.info(entry),
            chat_template=template,
            context_length=context_length_of(config),
            capabilities=caps,
            config=config,
            license=license_text,
        )
        return with_settings(show, entry.stored) if entry.stored is not None else show
