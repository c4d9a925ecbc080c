"""Each setting declared once (mlxgate/config.py): the table drives the
loader, the flags and README.md's configuration table, and every
MLXGATE_* variable is spelled in one module."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from mlxgate.config import TABLE, Config
from mlxgate.config_load import load_config
from mlxgate.settings import Row, markdown_table, with_table
from mlxgate_cli.main import build_parser, config_from_args

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [row for row in TABLE if row.key]

#: Every variable the loader read before the table existed (its 44 ENV_VARS
#: rows, Ollama's 4, and those read by code of their own): none may be lost.
READ_BEFORE = {
    "MLXGATE_HOST", "MLXGATE_PORT", "MLXGATE_GRPC_HOST", "MLXGATE_GRPC_PORT", "MLXGATE_GRPC_TARGET",
    "MLXGATE_REQUEST_TIMEOUT", "MLXGATE_METRICS_PORT", "MLXGATE_API_KEYS", "MLXGATE_ADMIN_KEYS",
    "MLXGATE_METRICS_PUBLIC", "MLXGATE_ALLOW_UNAUTHENTICATED", "MLXGATE_ALLOWED_HOSTS", "MLXGATE_SHUTDOWN_GRACE",
    "MLXGATE_FRONT_CHANNEL", "MLXGATE_GRPC_TLS_CERT", "MLXGATE_GRPC_TLS_KEY", "MLXGATE_GRPC_TLS_CA",
    "MLXGATE_WORKERS", "MLXGATE_DATA_DIR", "MLXGATE_MAX_BODY_BYTES", "MLXGATE_HTTP_IDLE_TIMEOUT",
    "MLXGATE_HTTP_BODY_TIMEOUT", "MLXGATE_RESPONSES_MAX_COUNT", "MLXGATE_RESPONSES_MAX_BYTES", "MLXGATE_MODELS_DIR",
    "MLXGATE_HF_CACHE", "MLXGATE_MAX_LOADED_MODELS", "MLXGATE_KEEP_ALIVE", "MLXGATE_MAX_BATCH_SIZE",
    "MLXGATE_MAX_PENDING", "MLXGATE_PREFILL_INTERLEAVE", "MLXGATE_PROMPT_CACHE_BYTES", "MLXGATE_MLX_ENABLED",
    "MLXGATE_DEFAULT_MAX_TOKENS", "MLXGATE_DISTRIBUTED", "MLXGATE_PIPELINE", "MLXGATE_DISTRIBUTED_TIMEOUT",
    "OLLAMA_UPSTREAM", "HF_ENDPOINT", "HF_TOKEN", "MLXGATE_CONNECT_TIMEOUT", "MLXGATE_FIRST_TOKEN_TIMEOUT",
    "MLXGATE_IDLE_TIMEOUT", "MLXGATE_CLOUD_BUDGET_DAY_USD", "MLXGATE_CLOUD_BUDGET_MONTH_USD",
    "MLXGATE_USAGE_RETENTION_DAYS", "MLXGATE_USAGE_LEDGER",
    "OLLAMA_KEEP_ALIVE", "OLLAMA_MAX_QUEUE", "OLLAMA_NUM_PARALLEL", "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_HOST", "OLLAMA_MODELS", "OLLAMA_ORIGINS", "MLXGATE_ORIGINS", "OPENAI_BASE_URL", "OPENAI_API_KEY",
    "MLXGATE_CLOUD_MODELS", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "MLXGATE_ANTHROPIC_MODELS",
    "MLXGATE_REMOTES", "MLXGATE_CONFIG", "MLXGATE_LOG_LEVEL",
}

#: Fields that are not settings a person sets.
NOT_SETTINGS = {"mlx.test_models_dir", "notes"}


def test_readme_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert with_table(readme, markdown_table(TABLE)) == readme, (
        "README.md's configuration table differs from mlxgate/config.py's settings: run `make readme`"
    )


def test_every_variable_read_before_is_in_the_table() -> None:
    named = {v for row in TABLE for v in row.variables}
    assert READ_BEFORE - named == set()


def _fields(section: Any, prefix: str = "") -> list[str]:
    """Every field under ``section`` (an instance), sections walked."""
    out = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out += _fields(value, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_every_field_is_a_declared_setting() -> None:
    """A new field without ``setting(...)`` would have no help, no README row."""
    keys = {row.key for row in SETTINGS}
    assert set(_fields(Config())) - NOT_SETTINGS == keys
    for row in SETTINGS:
        assert row.setting.help.strip(), row.key


def test_each_mlxgate_variable_is_spelled_in_one_module() -> None:
    where: dict[str, set[str]] = {}
    for package in ("mlxgate", "mlxgate_cli", "gateway", "backends"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("mlxgate/v1/"):  # generated from the proto's comments
                continue
            for name in re.findall(r"MLXGATE_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")):
                where.setdefault(name, set()).add(rel)
    assert len(where) > 40  # the scan found them
    spread = {name: sorted(mods) for name, mods in where.items() if len(mods) > 1}
    assert spread == {}


def _value_for(row: Row, tmp_path: Path) -> tuple[str, Any]:
    """A text a variable or flag may carry for ``row``, and the value it must give."""
    if row.key in ("server.grpc_tls_cert", "server.grpc_tls_key", "server.grpc_tls_ca"):
        pem = tmp_path / f"{row.key}.pem"
        pem.write_text("-----BEGIN CERTIFICATE-----\n")
        return str(pem), str(pem)
    special = {"server.front_channel": ("grpc", "grpc"), "mlx.default_keep_alive": ("10m", 600.0),
               "log_level": ("DEBUG", "DEBUG"),
               # settings with a set of allowed values
               "mlx.kv_bits": ("8", 8), "mlx.kv_group_size": ("128", 128)}
    if row.key in special:
        return special[row.key]
    kind = row.base_type
    if kind is bool:
        return ("0", False) if row.default else ("yes", True)
    if kind is int:
        return str(row.default + 7), row.default + 7
    if kind is float:
        base = row.default or 0.0
        return str(base + 2.5), base + 2.5
    if row.is_list:
        return "a, b", ["a", "b"]
    return "/some/where", "/some/where"


def _get(cfg: Config, key: str) -> Any:
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def _companions(row: Row, tmp_path: Path) -> dict[str, str]:
    """What a setting needs beside it to be accepted (a TLS key with its certificate)."""
    if row.key in ("server.grpc_tls_cert", "server.grpc_tls_key"):
        other = TABLE[[r.key for r in TABLE].index(
            "server.grpc_tls_key" if row.key == "server.grpc_tls_cert" else "server.grpc_tls_cert")]
        return {other.setting.env[0]: _value_for(other, tmp_path)[0]}
    return {}


@pytest.mark.parametrize("row", [r for r in SETTINGS if r.setting.env], ids=lambda r: r.key)
def test_each_variable_sets_its_field(row: Row, tmp_path: Path) -> None:
    text, value = _value_for(row, tmp_path)
    assert _get(load_config(env={}), row.key) != value  # the default is something else
    for var in row.setting.env:
        cfg = load_config(env={var: text, **_companions(row, tmp_path)})
        assert _get(cfg, row.key) == value, var
    if len(row.setting.env) > 1:  # the first named wins over the others
        first, *others = row.setting.env
        cfg = load_config(env={**{v: "1" for v in others}, first: text})
        assert _get(cfg, row.key) == value


@pytest.mark.parametrize("row", [r for r in SETTINGS if r.setting.flag], ids=lambda r: r.setting.flag)
def test_each_flag_sets_its_field(row: Row, tmp_path: Path) -> None:
    text, value = _value_for(row, tmp_path)
    for command in row.setting.commands:
        argv = [command, row.setting.flag] if row.base_type is bool else [command, row.setting.flag, text]
        if row.is_list:  # repeated, one value each
            argv = [command, row.setting.flag, "a", row.setting.flag, "b"]
        cfg = config_from_args(build_parser().parse_args(argv))
        assert _get(cfg, row.key) == (True if row.base_type is bool else value), argv


def test_flags_are_only_those_of_their_commands() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["service", "--workers", "2"])
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--metrics-port", "1"])


def test_a_bad_value_names_the_setting_and_the_variable_value() -> None:
    with pytest.raises(ValueError, match=r"ServerConfig\.port: invalid value 'eleven'"):
        load_config(env={"MLXGATE_PORT": "eleven"})
    # Each variable set is read, so a bad one fails even when another wins.
    with pytest.raises(ValueError, match="default_keep_alive"):
        load_config(env={"MLXGATE_KEEP_ALIVE": "10", "OLLAMA_KEEP_ALIVE": "ten minutes"})


def test_keys_are_cleaned_in_one_place() -> None:
    from mlxgate.keyring import KeyRing, clean, every_secret, first
    from mlxgate_cli.factory import build_backends

    cfg = load_config(env={"MLXGATE_MLX_ENABLED": "0", "MLXGATE_REMOTES": "h:1"},
                      overrides={"server.api_keys": ["", " k1 ", "k1", "k2"], "server.admin_keys": ["  "]})
    assert clean(cfg.server.api_keys) == ["k1", "k2"]
    assert every_secret(cfg.server) == ["k1", "k2"] and first(cfg.server.admin_keys) is None
    assert KeyRing.from_server(cfg.server).names() == ["key-1", "key-2"]
    # A remote service gets the first key as the gate compares it, not the raw "" or " k1 ".
    (remote,) = build_backends(cfg, {})
    assert remote._metadata == (("authorization", "Bearer k1"),)
