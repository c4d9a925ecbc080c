"""Loaded models: load on first use, keep_alive expiry, LRU eviction.

Ollama's keep_alive rules: None means the configured default, 0 unloads as
soon as the last request using the model finishes, a negative value never
expires.  A model with requests in flight ("pinned") is never unloaded or
evicted; when every resident model is pinned, a new load goes over
``max_loaded_models`` and the excess is evicted as soon as a model goes idle.

Loading and unloading touch MLX, so they run on the MLX thread only; the
bookkeeping (pins, expiry, the running list) is under a lock so the event loop
can pin an already-loaded model without a round trip to that thread.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from backends.errors import Unavailable
from backends.types import RunningModel
from backends.mlx.constrain import TokenizerCache
from backends.mlx.prompt_cache import new_store
from backends.mlx.registry import BACKEND, ModelEntry, ModelRegistry, context_length_of
from backends.mlx.vision.arch import vision_type
from mlxgate.config import MLXConfig

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    entry: ModelEntry
    model: Any
    tokenizer: Any
    config: dict
    context_length: int
    vocab_size: int
    size_bytes: int
    load_duration_ns: int
    details: Any = None
    refs: int = 0
    keep_alive: float = 0.0
    #: time.monotonic() deadline; None = no expiry.
    expires_at: Optional[float] = None
    last_used: float = field(default_factory=time.monotonic)
    lltok: TokenizerCache = field(default_factory=TokenizerCache)
    #: Bounded token counting (``context.TokenCounter``), made on first use.
    counter: Any = None
    # Owned by the engine thread.
    generator: Any = None
    #: Sizes this model's prefill chunks (``pacing.PrefillPacer``), made on first use.
    pacer: Any = None
    pending: list = field(default_factory=list)
    active: dict = field(default_factory=dict)
    #: Admitted sequences whose images are being prefilled (``vision/prefill.py``),
    #: a chunk per step, before they join the batch.
    staging: list = field(default_factory=list)
    #: Reusable KV caches of this model's finished sequences
    #: (``prompt_cache.PromptCacheStore``); None when reuse is off.
    prompt_cache: Any = None
    loaded: bool = True
    #: A vision-language model's vision parts (``vision.loader.Vision``); None for a text model.
    vision: Any = None
    #: Per layer, the KV-cache quantization it gets (``kv_quant.plan``); None: full precision throughout.
    kv_layers: Optional[list] = None
    #: Decode steps and prefill chunks run as one pass (``mixed.py``).
    fused: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)


def _load_files(entry: ModelEntry):
    """mlx-lm's load of the folder; a managed model's LoRA adapter applied
    (``adapter_path``) and its own chat template set on the tokenizer."""
    from mlx_lm.utils import load

    model, tokenizer = load(str(entry.path), adapter_path=str(entry.adapter) if entry.adapter else None)
    stored = entry.stored
    if stored is not None and stored.template:
        tokenizer._tokenizer.chat_template = stored.template
        tokenizer._chat_template = None  # a model's own renderer would win over the template
        tokenizer.has_chat_template = True
    return model, tokenizer


def _load_vision(entry: ModelEntry, config: dict):
    """(text view, tokenizer, Vision) of a VLM (``backends/mlx/vision/``)."""
    from backends.mlx.vision.loader import load

    return load(entry.path, config)


class ModelManager:
    def __init__(self, config: MLXConfig, registry: ModelRegistry) -> None:
        self._config = config
        self._registry = registry
        self._lock = threading.Lock()
        self._loaded: "OrderedDict[str, LoadedModel]" = OrderedDict()
        self.load_count = 0

    def _keep_alive(self, keep_alive: Optional[float]) -> float:
        return self._config.default_keep_alive if keep_alive is None else keep_alive

    # ---------------------------------------------------------------- any thread

    def pin_if_loaded(self, entry: ModelEntry) -> Optional[LoadedModel]:
        with self._lock:
            lm = self._loaded.get(entry.name.lower())
            if lm is not None:
                lm.refs += 1
                lm.last_used = time.monotonic()
                self._loaded.move_to_end(entry.name.lower())
            return lm

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._loaded.values())

    def running(self) -> list[RunningModel]:
        now_mono, now = time.monotonic(), datetime.now(timezone.utc)
        out = []
        with self._lock:
            for lm in self._loaded.values():
                if lm.refs > 0:
                    expires = None if lm.keep_alive < 0 else now + timedelta(seconds=lm.keep_alive)
                elif lm.expires_at is None:
                    expires = None
                else:
                    expires = now + timedelta(seconds=max(0.0, lm.expires_at - now_mono))
                out.append(
                    RunningModel(
                        name=lm.name,
                        backend=BACKEND,
                        size_bytes=lm.size_bytes,
                        expires_at=expires,
                        context_length=lm.context_length,
                        details=lm.details,
                    )
                )
        return out

    # ---------------------------------------------------------------- MLX thread

    def _load_files(self, entry: ModelEntry):
        """(model, tokenizer) of ``entry`` (``distributed/`` loads a shard instead)."""
        return _load_files(entry)

    def _load_vision(self, entry: ModelEntry, config: dict):
        """(text view, tokenizer, Vision) of a vision-language model."""
        return _load_vision(entry, config)

    def load_and_pin(self, entry: ModelEntry) -> LoadedModel:
        lm = self.pin_if_loaded(entry)
        if lm is not None:
            return lm
        self._evict_for_one_more()
        t0 = time.perf_counter_ns()
        file_config = self._registry.config(entry)
        vision = None
        try:
            if vision_type(file_config) is not None:
                model, tokenizer, vision = self._load_vision(entry, file_config)
            else:
                model, tokenizer = self._load_files(entry)
        except MemoryError as e:
            raise Unavailable(f"out of memory loading model {entry.name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any load failure: let the router try elsewhere
            msg = str(e)
            if "memory" in msg.lower() or "alloc" in msg.lower():
                raise Unavailable(f"out of memory loading model {entry.name}: {msg}") from None
            raise Unavailable(f"failed to load model {entry.name}: {type(e).__name__}: {msg}") from None
        from mlx.utils import tree_flatten

        size = sum(v.nbytes for _, v in tree_flatten((vision.model if vision else model).parameters()))
        vocab = int(file_config.get("vocab_size") or (file_config.get("text_config") or {}).get("vocab_size") or 0)
        lm = LoadedModel(
            entry=entry,
            model=model,
            tokenizer=tokenizer,
            config=file_config,
            context_length=context_length_of(file_config),
            vocab_size=vocab or len(tokenizer),
            size_bytes=size,
            load_duration_ns=time.perf_counter_ns() - t0,
            details=self._registry.details(entry),
            refs=1,
            keep_alive=self._config.default_keep_alive,
            prompt_cache=new_store(self._config.prompt_cache_bytes),
            vision=vision,
            kv_layers=self._kv_layers(entry, model),
            fused=self._fused(model, vision),
        )
        with self._lock:
            self._loaded[entry.name.lower()] = lm
            self.load_count += 1
        log.info("loaded %s (%.1f MB) in %.2fs", entry.name, size / 1e6, lm.load_duration_ns / 1e9)
        return lm

    def _fused(self, model: Any, vision: Any) -> bool:
        from backends.mlx import mixed

        if not self._config.fused_prefill or vision is not None or not mixed.fusable(model):
            return False
        mixed.install(model)
        return True

    def _kv_layers(self, entry: ModelEntry, model: Any) -> Optional[list]:
        settings = self._config.kv_cache_for(entry.name)
        if settings.bits is None:
            return None
        from backends.mlx import kv_quant

        return kv_quant.plan(model, settings, entry.name)

    def release(self, lm: LoadedModel, keep_alive: Optional[float]) -> None:
        """A request using ``lm`` ended; keep_alive decides how long the model stays."""
        ka = self._keep_alive(keep_alive)
        with self._lock:
            lm.refs = max(0, lm.refs - 1)
            lm.keep_alive = ka
            lm.last_used = time.monotonic()
            if lm.refs == 0:
                lm.expires_at = None if ka < 0 else lm.last_used + ka
        if lm.refs == 0 and ka == 0:
            self.unload(lm)
        self._enforce_limit()

    def unload_by_name(self, entry: ModelEntry) -> bool:
        with self._lock:
            lm = self._loaded.get(entry.name.lower())
            if lm is None:
                return False
            if lm.refs > 0:
                # In use: unload as soon as the last request finishes.
                lm.keep_alive = 0.0
                return True
        self.unload(lm)
        return True

    def unload(self, lm: LoadedModel) -> None:
        with self._lock:
            if lm.refs > 0 or self._loaded.get(lm.name.lower()) is not lm:
                return
            del self._loaded[lm.name.lower()]
        lm.loaded = False
        if lm.generator is not None:
            lm.generator.close()
        lm.generator = lm.model = lm.prompt_cache = lm.vision = None
        gc.collect()
        import mlx.core as mx

        mx.clear_cache()
        log.info("unloaded %s", lm.name)

    def expire(self) -> None:
        now = time.monotonic()
        for lm in self.loaded():
            if lm.refs == 0 and lm.expires_at is not None and lm.expires_at <= now:
                self.unload(lm)

    def next_deadline(self) -> Optional[float]:
        with self._lock:
            deadlines = [lm.expires_at for lm in self._loaded.values() if lm.refs == 0 and lm.expires_at is not None]
        return min(deadlines) if deadlines else None

    def _idle_lru(self) -> Optional[LoadedModel]:
        with self._lock:
            return next((lm for lm in self._loaded.values() if lm.refs == 0), None)

    def _evict_for_one_more(self) -> None:
        while len(self.loaded()) >= self._config.max_loaded_models:
            victim = self._idle_lru()
            if victim is None:
                log.warning("all %d loaded models are busy; loading one more", len(self.loaded()))
                return
            self.unload(victim)

    def _enforce_limit(self) -> None:
        while len(self.loaded()) > self._config.max_loaded_models:
            victim = self._idle_lru()
            if victim is None:
                return
            self.unload(victim)

    def unload_all(self) -> None:
        for lm in self.loaded():
            with self._lock:
                lm.refs = 0
            self.unload(lm)
