"""``load_config``: defaults < TOML file < environment < flags, into the
dataclasses of ``mlxgate/config.py``, then checked.

Values are converted by each field's type (``mlxgate.settings.convert``);
the variables of a setting are those its declaration names.  A few inputs
take code of their own here: Ollama's OLLAMA_HOST (host and port) and
OLLAMA_MODELS (only a folder of MLX models), the origin lists that add up,
the cloud providers and remote services the environment adds, and the checks
of what belongs together.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from mlxgate.config import (
    ANTHROPIC_MODELS_ENV,
    CLOUD_MODELS_ENV,
    CONFIG_ENV,
    FRONT_CHANNELS,
    ORIGINS_ENV,
    REMOTES_ENV,
    TABLE,
    CloudProvider,
    Config,
    KeyEntry,
    RemoteService,
    ServerConfig,
    UpstreamTimeouts,
    check_mlx_models,
    env_var,
    parse_ollama_host,
)
from mlxgate.settings import convert, declared, field_type, split_list


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
    path = path or env.get(CONFIG_ENV)
    if path:
        with open(Path(path).expanduser(), "rb") as f:
            try:
                table = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: {e}") from None
        _apply_table(cfg, table)
    _ollama_env(cfg, env)
    _apply_env(cfg, env)
    # Origin lists add up: TOML, OLLAMA_ORIGINS, then mlxgate's own.
    for var in ("OLLAMA_ORIGINS", ORIGINS_ENV):
        for origin in split_list(env.get(var, "")):
            if origin not in cfg.server.origins:
                cfg.server.origins.append(origin)
    _cloud_from_env(cfg, env)
    _remotes_from_env(cfg, env)
    for key, value in (overrides or {}).items():
        if value is None or value == []:
            continue
        _set_key(cfg, key, value)
    _check_remotes(cfg)
    _check_keys(cfg, env)
    _check_spend(cfg)
    check_mlx_models(cfg.mlx)
    _drop_loops(cfg)
    _upstream_defaults(cfg)
    _check_server(cfg.server)
    _check_tls(cfg)
    return cfg


# ------------------------------------------------------------------ setting values


def _set(section: Any, name: str, value: Any) -> None:
    cls = type(section)
    try:
        kind = field_type(cls, name)
    except KeyError:
        raise ValueError(f"unknown configuration key {cls.__name__}.{name}") from None
    what = declared(cls, name)
    try:
        setattr(section, name, convert(value, kind, what.parse if what else None, name))
    except ValueError as e:
        raise ValueError(f"{cls.__name__}.{name}: invalid value {value!r} ({e})") from None


def _set_key(cfg: Config, key: str, value: Any) -> None:
    """``key``: "section.field", or a top-level field ("log_level")."""
    section, _, name = key.rpartition(".")
    _set(getattr(cfg, section) if section else cfg, name, value)


def _apply_env(cfg: Config, env: Mapping[str, str]) -> None:
    """Each setting's variables, the first one named winning (each one set is
    still converted, so a bad value is an error even when another wins)."""
    for row in TABLE:
        for var in reversed(row.setting.env):
            if row.key and env.get(var):
                _set_key(cfg, row.key, env[var])


def _entries(key: str, value: Any, cls: type, fields: str) -> list:
    """A TOML array of tables (``[[key]]``), each built into ``cls``; a wrong shape or field names the key."""
    if not isinstance(value, list):
        raise ValueError(f"{key}: expected [[{key}]] entries ({fields})")
    out = []
    for entry in value:
        try:
            out.append(cls(**entry))
        except TypeError as e:
            raise ValueError(f"{key}: {e}") from None
    return out


def _apply_table(cfg: Config, data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if key == "aliases":
            cfg.aliases.update({k: [v] if isinstance(v, str) else list(v) for k, v in value.items()})
        elif key == "catalog":
            if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
                raise ValueError('catalog: expected "name" = "owner/repo[:revision]" entries')
            cfg.catalog.update(value)
        elif key == "cloud":
            for p in value.get("providers", []):
                try:
                    cfg.cloud.providers.append(CloudProvider(**p))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"cloud.providers: {e}") from None
        elif key == "remote":
            cfg.remotes += _entries(key, value, RemoteService, "name, target, key_env or key")
        elif key == "keys":
            cfg.server.keys += _entries(key, value, KeyEntry, "name, key_env or key, admin, limits, models")
        elif key == "log_level":
            _set(cfg, key, value)
        elif isinstance(value, Mapping) and hasattr(cfg, key):
            section = getattr(cfg, key)
            for name, v in value.items():
                _set(section, name, v)
        else:
            raise ValueError(f"unknown configuration key {key!r}")


# ------------------------------------------------------------------ inputs with code of their own


def holds_mlx_models(path: Path) -> bool:
    """A folder with at least one MLX model sub-folder (config.json and safetensors)."""
    try:
        return any(
            sub.is_dir() and (sub / "config.json").is_file() and any(sub.glob("*.safetensors"))
            for sub in path.iterdir()
        )
    except OSError:
        return False


def _ollama_env(cfg: Config, env: Mapping[str, str]) -> None:
    """OLLAMA_HOST and OLLAMA_MODELS, applied before mlxgate's variables (which win)."""
    host = env.get("OLLAMA_HOST")
    if host:
        h, port = parse_ollama_host(host)
        cfg.server.host = h
        if port is not None:
            cfg.server.port = port
    models = env.get("OLLAMA_MODELS")
    if models:
        path = Path(models).expanduser()
        if holds_mlx_models(path):
            cfg.mlx.models_dir = str(path)
        elif (path / "manifests").is_dir() or (path / "blobs").is_dir():
            cfg.notes.append(
                f"OLLAMA_MODELS={models} is ignored: it is an Ollama model store (GGUF blobs and manifests), "
                f"which MLX cannot load; set {env_var('mlx.models_dir')} to a folder of MLX models, and "
                f"{env_var('ollama.upstream')} to a running Ollama to serve those"
            )
        else:
            cfg.notes.append(f"OLLAMA_MODELS={models} is ignored: it holds no MLX model folders")


def _cloud_from_env(cfg: Config, env: Mapping[str, str]) -> None:
    """OPENAI_BASE_URL / OPENAI_API_KEY give the common single provider
    ("openai"), ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY an Anthropic one
    ("anthropic"), each unless the file already names one so."""
    names = {p.name for p in cfg.cloud.providers}
    base = env.get("OPENAI_BASE_URL")
    if "openai" not in names and (base or env.get("OPENAI_API_KEY")):
        cfg.cloud.providers.append(
            CloudProvider(
                name="openai",
                base_url=base or "https://api.openai.com/v1",
                api_key_env="OPENAI_API_KEY",
                models=split_list(env.get(CLOUD_MODELS_ENV, "")),
            )
        )
    base = env.get("ANTHROPIC_BASE_URL")
    if "anthropic" not in names and (base or env.get("ANTHROPIC_API_KEY")):
        cfg.cloud.providers.append(
            CloudProvider(
                name="anthropic",
                kind="anthropic",
                base_url=base or "https://api.anthropic.com",
                api_key_env="ANTHROPIC_API_KEY",
                models=split_list(env.get(ANTHROPIC_MODELS_ENV, "")),
            )
        )


def _remotes_from_env(cfg: Config, env: Mapping[str, str]) -> None:
    """``REMOTES_ENV`` = host:port,name=host:port,...: more remote services (after
    the TOML ones; a target already configured is not added twice).  A bare
    target names itself (backend ``remote:host:port``)."""
    for entry in split_list(env.get(REMOTES_ENV, "")):
        name, sep, target = entry.partition("=")
        if not sep:
            name, target = "", entry
        target = target.strip()
        if any(r.target == target for r in cfg.remotes):
            continue
        cfg.remotes.append(RemoteService(name=name.strip(), target=target))


def _upstream_defaults(cfg: Config) -> None:
    """Per-upstream timeouts left unset take the ``[upstream]`` defaults."""
    targets: list[Any] = [cfg.ollama, *cfg.cloud.providers, *cfg.remotes]
    for t in targets:
        for f in dataclasses.fields(UpstreamTimeouts):
            if getattr(t, f.name) is None:
                setattr(t, f.name, getattr(cfg.upstream, f.name))


# ------------------------------------------------------------------ checks


def _points_here(base_url: str, server: ServerConfig) -> bool:
    """Whether an upstream's URL is this server's own HTTP address (a loop)."""
    try:
        u = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        return False
    host = (u.hostname or "").lower()
    local = host in ("localhost", "::1", "0.0.0.0", "::") or host.startswith("127.") or host == server.host.lower()
    return local and port == server.port


def _drop_loops(cfg: Config) -> None:
    """A cloud provider pointing at this very server (ANTHROPIC_BASE_URL or
    OPENAI_BASE_URL exported for a client such as Claude Code, in the shell
    that runs mlxgate) would forward every request it cannot serve to itself,
    forever: it is left out, with a note saying why."""
    kept = []
    for p in cfg.cloud.providers:
        if _points_here(p.base_url, cfg.server):
            cfg.notes.append(
                f"cloud provider {p.name!r} is ignored: its base_url {p.base_url} is this server's own address "
                f"(port {cfg.server.port}), so it would send requests back to itself"
            )
        else:
            kept.append(p)
    cfg.cloud.providers = kept


#: Names become metric labels, header values and alias prefixes.
_REMOTE_NAME = re.compile(r"^[A-Za-z0-9._:\-\[\]]{1,128}$")


def _check_remotes(cfg: Config) -> None:
    names: set[str] = set()
    for r in cfg.remotes:
        if not r.target or ":" not in r.target or not r.target.rsplit(":", 1)[1].isdigit():
            raise ValueError(f"remote {r.name or r.target!r}: target must be host:port, got {r.target!r}")
        r.name = r.name or r.target
        if not _REMOTE_NAME.match(r.name):
            raise ValueError(f"remote {r.name!r}: a name is 1-128 characters of [A-Za-z0-9._:-]")
        if r.name in names:
            raise ValueError(f"remote {r.name!r} is configured twice")
        names.add(r.name)
        if r.key and r.key_env:
            raise ValueError(f"remote {r.name!r}: set key_env or key, not both")


#: Key names become ledger columns and metric labels.
_KEY_NAME = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


def _check_keys(cfg: Config, env: Mapping[str, str]) -> None:
    """``[[keys]]``: names valid and unique (``key-N`` is the plain keys'),
    each secret resolved from ``key_env`` (or ``key``), limits not negative."""
    names: set[str] = set()
    for k in cfg.server.keys:
        if not _KEY_NAME.match(k.name or ""):
            raise ValueError(f"keys: name {k.name!r} must be 1-64 characters of [A-Za-z0-9._-]")
        if re.fullmatch(r"key-\d+", k.name):
            raise ValueError(f"keys: name {k.name!r} is reserved for the keys of {env_var('server.api_keys')}")
        if k.name in names:
            raise ValueError(f"keys: {k.name!r} is configured twice")
        names.add(k.name)
        if k.key and k.key_env:
            raise ValueError(f"keys: {k.name!r}: set key_env or key, not both")
        if k.key_env:
            k.key = env.get(k.key_env, "").strip()
            if not k.key:
                raise ValueError(f"keys: {k.name!r}: environment variable {k.key_env} is not set")
        if not k.key.strip():
            raise ValueError(f"keys: {k.name!r} needs key_env (an environment variable holding the key) or key")
        for what in ("requests_per_minute", "tokens_per_minute", "cloud_usd_per_day"):
            v = getattr(k, what)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"keys: {k.name!r}: {what} must be a number, 0 or more")
        if not isinstance(k.models, list) or not all(isinstance(m, str) for m in k.models):
            raise ValueError(f"keys: {k.name!r}: models must be a list of model names")


def _check_spend(cfg: Config) -> None:
    b = cfg.budget
    for what in ("cloud_usd_per_day", "cloud_usd_per_month"):
        v = getattr(b, what)
        if v is not None and v < 0:
            raise ValueError(f"budget.{what} must be 0 or more, got {v}")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(b.timezone)
    except (ValueError, KeyError, OSError):
        raise ValueError(f"budget.timezone: unknown time zone {b.timezone!r} (an IANA name such as "
                         "'Europe/Berlin', or 'UTC')") from None
    if cfg.usage.retention_days <= 0:
        raise ValueError(f"usage.retention_days must be above 0, got {cfg.usage.retention_days}")


def _check_server(s: ServerConfig) -> None:
    if s.responses_max_count < 1 or s.responses_max_bytes < 1:
        raise ValueError("server.responses_max_count and server.responses_max_bytes must be at least 1")
    if s.fetch_image_timeout <= 0:
        raise ValueError(f"server.fetch_image_timeout must be positive, got {s.fetch_image_timeout}")
    if s.front_channel not in FRONT_CHANNELS:
        raise ValueError(f"server.front_channel must be one of {', '.join(FRONT_CHANNELS)}, "
                         f"got {s.front_channel!r}")
    if s.workers < 1:
        raise ValueError(f"server.workers must be at least 1, got {s.workers}")
    if s.workers > 1 and s.grpc_target:
        raise ValueError("server.workers above 1 needs the inference service in this process: "
                         "it cannot be combined with grpc_target")
    if s.http_idle_timeout <= 0 or s.http_body_timeout <= 0:
        raise ValueError("server.http_idle_timeout and server.http_body_timeout must be above 0 seconds")


def _check_tls(cfg: Config) -> None:
    """TLS settings that go together, and PEM files that can be read (a
    one-line error at start rather than a failed handshake later)."""
    from mlxgate.grpc_tls import read_pem

    s = cfg.server
    if bool(s.grpc_tls_cert) != bool(s.grpc_tls_key):
        raise ValueError(f"server.grpc_tls_cert and server.grpc_tls_key go together "
                         f"({env_var('server.grpc_tls_cert')}, {env_var('server.grpc_tls_key')}): set both or neither")
    if s.grpc_tls_cert and s.front_channel == "grpc" and not s.grpc_target and s.workers == 1:
        raise ValueError("server.front_channel = grpc does not go with grpc_tls_cert (the front would call its "
                         "own TLS port by a loopback address): use front_channel = in-process, the default")
    for path, what in ((s.grpc_tls_cert, "server.grpc_tls_cert"), (s.grpc_tls_key, "server.grpc_tls_key"),
                       (s.grpc_tls_ca, "server.grpc_tls_ca"),
                       *((r.tls_ca, f"remote {r.name!r}: tls_ca") for r in cfg.remotes)):
        if path:
            read_pem(path, what)
