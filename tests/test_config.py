"""Config precedence: defaults < TOML < env < flags."""

from pathlib import Path

import pytest

from mlxgate.cli import build_parser, config_from_args
from mlxgate.config import load_config


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg.server.port == 11434
    assert cfg.server.grpc_port == 50051
    assert cfg.server.host == "127.0.0.1"
    assert cfg.mlx.models_dir == "~/.mlx_models"
    assert cfg.mlx.default_keep_alive == 300.0
    assert cfg.ollama.upstream is None
    assert cfg.cloud.providers == []


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "mlxgate.toml"
    toml.write_text(
        '[server]\nport = 1000\ngrpc_port = 2000\n[mlx]\nmodels_dir = "/from/toml"\n'
        '[aliases]\n"llama3.2" = ["mlx:tiny", "ollama:llama3.2"]\n'
        '[[cloud.providers]]\nname = "groq"\nbase_url = "https://api.groq.com/openai/v1"\n'
        'api_key_env = "GROQ_API_KEY"\n'
    )
    cfg = load_config(toml, env={"MLXGATE_PORT": "3000"}, overrides={"server.grpc_port": 4000, "mlx.models_dir": None})
    assert cfg.server.port == 3000  # env beats TOML
    assert cfg.server.grpc_port == 4000  # flag beats TOML
    assert cfg.mlx.models_dir == "/from/toml"  # unset flag leaves TOML value
    assert cfg.aliases["llama3.2"] == ["mlx:tiny", "ollama:llama3.2"]
    assert cfg.cloud.providers[0].name == "groq"
    assert cfg.cloud.providers[0].api_key_env == "GROQ_API_KEY"


def test_openai_env_adds_provider_without_leaking_key() -> None:
    cfg = load_config(env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-secret"})
    (p,) = cfg.cloud.providers
    assert p.base_url == "http://127.0.0.1:9/v1"
    assert p.api_key_env == "OPENAI_API_KEY"
    assert "sk-secret" not in repr(cfg)


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("[server]\nprot = 1\n")
    with pytest.raises(ValueError, match="server|prot"):
        load_config(toml, env={})


def test_cli_flags_reach_config() -> None:
    args = build_parser().parse_args(
        ["serve", "--port", "0", "--grpc-port", "0", "--models-dir", "/m", "--grpc-target", "h:1"]
    )
    cfg = config_from_args(args)
    assert (cfg.server.port, cfg.server.grpc_port, cfg.mlx.models_dir, cfg.server.grpc_target) == (0, 0, "/m", "h:1")
