"""The one configuration object, built from defaults < TOML file < env < flags.

Everything downstream receives a ``Config`` (or the section it needs); nothing
reads the environment or argv on its own.  Keys in the TOML file mirror the
dataclass fields, e.g.::

    [server]
    port = 11434

    [mlx]
    models_dir = "~/.mlx_models"
    max_loaded_models = 2

    [aliases]
    "llama3.2" = ["mlx:Llama-3.2-3B-Instruct-4bit", "ollama:llama3.2", "cloud:openai:gpt-4o-mini"]

    [ollama]
    upstream = "http://otherbox:11434"

    [[cloud.providers]]
    name = "openrouter"
    base_url = "https://openrouter.ai/api/v1"
    api_key_env = "OPENROUTER_API_KEY"
    models = ["meta-llama/llama-3.1-8b-instruct"]
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 11434
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    #: When set, the HTTP front calls this inference service instead of
    #: starting one in-process.
    grpc_target: Optional[str] = None
    #: Deadline the front puts on each gRPC call, in seconds.
    request_timeout: float = 600.0
    #: Largest request body the front accepts, in bytes.
    max_body_bytes: int = 32 * 1024 * 1024
    #: Port for /metrics when only the inference service runs (``mlxgate service``).
    metrics_port: int = 9464


@dataclass
class MLXConfig:
    models_dir: str = "~/.mlx_models"
    #: Hugging Face hub cache; scanned for mlx models when it exists.
    hf_cache: Optional[str] = None
    #: Most models resident at once; the least recently used is evicted.
    max_loaded_models: int = 2
    #: Ollama's default keep_alive, seconds.
    default_keep_alive: float = 300.0
    default_max_tokens: int = 512
    #: Sequences decoded together in one step (continuous batching).
    max_batch_size: int = 16
    #: Requests queued or running before new ones are refused with
    #: RESOURCE_EXHAUSTED (Ollama's OLLAMA_MAX_QUEUE, same default).
    max_pending: int = 512
    prefill_step_size: int = 512
    #: Bytes of finished sequences' KV caches kept per process (all models
    #: together) so a prompt sharing a prefix with an earlier one (the next
    #: turn of a chat, a repeated system prompt) skips that part of prefill;
    #: 0 turns prompt-cache reuse off.
    prompt_cache_bytes: int = 512 * 1024 * 1024
    #: When the models directory is empty, generate a small test model into
    #: it so the server has something to serve (``make run`` on a fresh box).
    bootstrap_test_model: bool = True
    #: Set false to run without the MLX engine (gateway to Ollama/cloud only).
    enabled: bool = True


@dataclass
class OllamaConfig:
    #: Base URL of an upstream Ollama, e.g. http://otherbox:11434; None = off.
    upstream: Optional[str] = None
    timeout: float = 600.0
    connect_timeout: float = 5.0


@dataclass
class CloudProvider:
    name: str
    base_url: str
    #: Name of the environment variable that holds the key (never the key).
    api_key_env: str = ""
    #: Models to offer from this provider; empty = ask its /models.
    models: list[str] = field(default_factory=list)
    timeout: float = 600.0


@dataclass
class CloudConfig:
    providers: list[CloudProvider] = field(default_factory=list)


@dataclass
class RouterConfig:
    #: Backends tried for one request, fallbacks included.
    retry_budget: int = 3
    #: Consecutive failures that open a backend's circuit ...
    breaker_failures: int = 3
    #: ... and how long it then stays out before a probe, seconds.
    breaker_cooldown: float = 30.0
    #: How long a backend's model list is reused, seconds.
    model_list_ttl: float = 10.0


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    mlx: MLXConfig = field(default_factory=MLXConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    #: Public name -> ordered targets "mlx:<name>", "ollama:<tag>",
    #: "cloud:<provider>:<model>".
    aliases: dict[str, list[str]] = field(default_factory=dict)
    log_level: str = "INFO"

    def models_path(self) -> Path:
        return Path(self.mlx.models_dir).expanduser()


# Environment variables, each mapped onto one (section, field).
ENV_VARS: dict[str, tuple[str, str]] = {
    "MLXGATE_HOST": ("server", "host"),
    "MLXGATE_PORT": ("server", "port"),
    "MLXGATE_GRPC_HOST": ("server", "grpc_host"),
    "MLXGATE_GRPC_PORT": ("server", "grpc_port"),
    "MLXGATE_GRPC_TARGET": ("server", "grpc_target"),
    "MLXGATE_REQUEST_TIMEOUT": ("server", "request_timeout"),
    "MLXGATE_METRICS_PORT": ("server", "metrics_port"),
    "MLXGATE_MODELS_DIR": ("mlx", "models_dir"),
    "MLXGATE_HF_CACHE": ("mlx", "hf_cache"),
    "MLXGATE_MAX_LOADED_MODELS": ("mlx", "max_loaded_models"),
    "MLXGATE_KEEP_ALIVE": ("mlx", "default_keep_alive"),
    "MLXGATE_MAX_BATCH_SIZE": ("mlx", "max_batch_size"),
    "MLXGATE_MAX_PENDING": ("mlx", "max_pending"),
    "MLXGATE_PROMPT_CACHE_BYTES": ("mlx", "prompt_cache_bytes"),
    "MLXGATE_MLX_ENABLED": ("mlx", "enabled"),
    "OLLAMA_UPSTREAM": ("ollama", "upstream"),
}


def _coerce(value: Any, target_type: Any) -> Any:
    """Turn an env/flag string into the field's type."""
    if not isinstance(value, str):
        return value
    t = str(target_type)
    if "bool" in t:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if "int" in t:
        return int(value)
    if "float" in t:
        return float(value)
    return value


def _set(section: Any, name: str, value: Any) -> None:
    types = {f.name: f.type for f in dataclasses.fields(section)}
    if name not in types:
        raise ValueError(f"unknown configuration key {type(section).__name__}.{name}")
    setattr(section, name, _coerce(value, types[name]))


def _apply_table(cfg: Config, data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if key == "aliases":
            cfg.aliases.update({k: [v] if isinstance(v, str) else list(v) for k, v in value.items()})
        elif key == "cloud":
            for p in value.get("providers", []):
                cfg.cloud.providers.append(CloudProvider(**p))
        elif key == "log_level":
            cfg.log_level = value
        elif isinstance(value, Mapping) and hasattr(cfg, key):
            section = getattr(cfg, key)
            for name, v in value.items():
                _set(section, name, v)
        else:
            raise ValueError(f"unknown configuration key {key!r}")


def _cloud_from_env(cfg: Config, env: Mapping[str, str]) -> None:
    """OPENAI_BASE_URL / OPENAI_API_KEY give the common single provider."""
    if any(p.name == "openai" for p in cfg.cloud.providers):
        return
    base = env.get("OPENAI_BASE_URL")
    if base or env.get("OPENAI_API_KEY"):
        models = [m for m in env.get("MLXGATE_CLOUD_MODELS", "").split(",") if m]
        cfg.cloud.providers.append(
            CloudProvider(
                name="openai",
                base_url=base or "https://api.openai.com/v1",
                api_key_env="OPENAI_API_KEY",
                models=models,
            )
        )


def load_config(
    path: Optional[str | os.PathLike] = None,
    env: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Defaults, then the TOML file, then env vars, then ``overrides``.

    ``overrides`` maps "section.field" (or a top-level field) to a value, as
    the CLI builds it from flags; None values are ignored.
    """
    env = os.environ if env is None else env
    cfg = Config()
    path = path or env.get("MLXGATE_CONFIG")
    if path:
        with open(Path(path).expanduser(), "rb") as f:
            _apply_table(cfg, tomllib.load(f))
    for var, (section, name) in ENV_VARS.items():
        if env.get(var):
            _set(getattr(cfg, section), name, env[var])
    _cloud_from_env(cfg, env)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        if "." in dotted:
            section, name = dotted.split(".", 1)
            _set(getattr(cfg, section), name, value)
        else:
            setattr(cfg, dotted, value)
    return cfg
