"""Config precedence: defaults < TOML < env < flags."""

from pathlib import Path

import pytest

from mlxgate_cli.main import build_parser, config_from_args
from mlxgate.config_load import load_config


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


def test_ollama_env_vars_with_mlxgate_winning(tmp_path: Path) -> None:
    env = {
        "OLLAMA_HOST": "http://0.0.0.0:8080",
        "OLLAMA_KEEP_ALIVE": "10m",
        "OLLAMA_MAX_QUEUE": "7",
        "OLLAMA_NUM_PARALLEL": "3",
        "OLLAMA_MAX_LOADED_MODELS": "5",
        "OLLAMA_ORIGINS": "https://a.example,https://b.example",
        "MLXGATE_ORIGINS": "https://c.example",
        "MLXGATE_MAX_PENDING": "9",  # mlxgate's own variable wins
    }
    cfg = load_config(env=env)
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 8080)
    assert cfg.mlx.default_keep_alive == 600.0
    assert cfg.mlx.max_pending == 9
    assert cfg.mlx.max_batch_size == 3
    assert cfg.mlx.max_loaded_models == 5
    assert cfg.server.origins == ["https://a.example", "https://b.example", "https://c.example"]


@pytest.mark.parametrize(
    "value, expected",
    [("127.0.0.1", ("127.0.0.1", None)), (":9999", ("127.0.0.1", 9999)), ("https://[::1]:7", ("::1", 7)),
     ("localhost:11500", ("localhost", 11500))],
)
def test_ollama_host_forms(value: str, expected: tuple) -> None:
    from mlxgate.config import parse_ollama_host

    assert parse_ollama_host(value) == expected


def test_ollama_models_store_is_ignored_with_a_note(tmp_path: Path) -> None:
    store = tmp_path / "ollama"
    (store / "manifests").mkdir(parents=True)
    (store / "blobs").mkdir()
    cfg = load_config(env={"OLLAMA_MODELS": str(store)})
    assert cfg.mlx.models_dir == "~/.mlx_models"
    assert any("OLLAMA_MODELS" in n and "MLX cannot load" in n for n in cfg.notes)
    mlx = tmp_path / "mlx"
    (mlx / "m").mkdir(parents=True)
    (mlx / "m" / "config.json").write_text("{}")
    (mlx / "m" / "model.safetensors").write_bytes(b"")
    assert load_config(env={"OLLAMA_MODELS": str(mlx)}).mlx.models_dir == str(mlx)


def test_upstream_timeouts_default_from_env_and_per_upstream(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text(
        '[ollama]\nupstream = "http://x:1"\nidle_timeout = 5.0\n'
        '[[cloud.providers]]\nname = "a"\nbase_url = "http://y/v1"\n'
    )
    cfg = load_config(toml, env={"MLXGATE_FIRST_TOKEN_TIMEOUT": "7", "MLXGATE_IDLE_TIMEOUT": "9"})
    assert (cfg.ollama.connect_timeout, cfg.ollama.first_token_timeout, cfg.ollama.idle_timeout) == (10.0, 7.0, 5.0)
    p = cfg.cloud.providers[0]
    assert (p.connect_timeout, p.first_token_timeout, p.idle_timeout) == (10.0, 7.0, 9.0)


def test_api_keys_from_env_toml_and_flags(tmp_path: Path) -> None:
    assert load_config(env={"MLXGATE_API_KEYS": "k1, k2"}).server.api_keys == ["k1", "k2"]
    toml = tmp_path / "k.toml"
    toml.write_text('[server]\napi_keys = ["t1"]\n')
    assert load_config(toml, env={}).server.api_keys == ["t1"]
    args = build_parser().parse_args(["serve", "--api-key", "f1", "--api-key", "f2"])
    assert config_from_args(args).server.api_keys == ["f1", "f2"]


def test_data_dir_from_env_flag_or_the_platform_folder(tmp_path: Path) -> None:
    import platformdirs

    assert load_config(env={}).data_path() == Path(platformdirs.user_data_dir("mlxgate", appauthor=False))
    assert load_config(env={"MLXGATE_DATA_DIR": str(tmp_path)}).data_path() == tmp_path
    args = build_parser().parse_args(["serve", "--data-dir", "~/d"])
    assert config_from_args(args).data_path() == Path("~/d").expanduser()
    # The front, which has only the server section, finds the same folder.
    assert load_config(env={"MLXGATE_DATA_DIR": str(tmp_path)}).server.data_path() == tmp_path


def test_responses_store_bounds(tmp_path: Path) -> None:
    cfg = load_config(env={})
    assert (cfg.server.responses_max_count, cfg.server.responses_max_bytes) == (10_000, 256 * 1024 * 1024)
    env = {"MLXGATE_RESPONSES_MAX_COUNT": "50", "MLXGATE_RESPONSES_MAX_BYTES": "1048576"}
    cfg = load_config(env=env)
    assert (cfg.server.responses_max_count, cfg.server.responses_max_bytes) == (50, 1048576)
    toml = tmp_path / "r.toml"
    toml.write_text("[server]\nresponses_max_count = 7\n")
    assert load_config(toml, env={}).server.responses_max_count == 7
    with pytest.raises(ValueError, match="responses_max_count"):
        load_config(env={"MLXGATE_RESPONSES_MAX_COUNT": "0"})


def test_remote_services_from_toml_and_env(tmp_path: Path) -> None:
    toml = tmp_path / "remotes.toml"
    toml.write_text(
        '[upstream]\nfirst_token_timeout = 200.0\n'
        '[[remote]]\nname = "studio2"\ntarget = "studio2.lan:50051"\nkey_env = "STUDIO2_KEY"\nidle_timeout = 5.0\n'
        '[[remote]]\ntarget = "10.0.0.3:50051"\nkey = "sk-in-the-file"\n'
    )
    cfg = load_config(toml, env={"MLXGATE_REMOTES": "10.0.0.3:50051, mini=10.0.0.4:50051,[::1]:50052"})
    assert [(r.name, r.target) for r in cfg.remotes] == [
        ("studio2", "studio2.lan:50051"),
        ("10.0.0.3:50051", "10.0.0.3:50051"),  # named after its target; not added twice by the env
        ("mini", "10.0.0.4:50051"),
        ("[::1]:50052", "[::1]:50052"),
    ]
    studio = cfg.remotes[0]
    assert (studio.key_env, studio.first_token_timeout, studio.idle_timeout) == ("STUDIO2_KEY", 200.0, 5.0)
    assert "sk-in-the-file" not in repr(cfg)


@pytest.mark.parametrize("text, error", [
    ('[[remote]]\nname = "a"\n', "target must be host:port"),
    ('[[remote]]\ntarget = "nohost"\n', "target must be host:port"),
    ('[[remote]]\ntarget = "h:1"\nname = "a b"\n', "a name is"),
    ('[[remote]]\ntarget = "h:1"\nname = "a"\n[[remote]]\ntarget = "h:2"\nname = "a"\n', "configured twice"),
    ('[[remote]]\ntarget = "h:1"\nkey = "k"\nkey_env = "K"\n', "not both"),
    ('[[remote]]\ntarget = "h:1"\nhost = "x"\n', "remote: .*host"),
    ('remote = "h:1"\n', "expected \\[\\[remote\\]\\]"),
])
def test_remote_entries_are_checked(tmp_path: Path, text: str, error: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ValueError, match=error):
        load_config(toml, env={})


def test_remotes_come_after_mlx_and_share_the_fronts_key() -> None:
    from mlxgate_cli.factory import build_backends

    cfg = load_config(env={"MLXGATE_REMOTES": "h:1,named=h:2", "MLXGATE_MLX_ENABLED": "false",
                           "OLLAMA_UPSTREAM": "http://127.0.0.1:9", "MLXGATE_API_KEYS": "front-key,other"})
    backends = build_backends(cfg, {})
    assert [b.name for b in backends] == ["remote:h:1", "remote:named", "ollama"]
    assert backends[0]._metadata == (("authorization", "Bearer front-key"),)


def test_workers_from_toml_env_and_flag(tmp_path: Path) -> None:
    assert load_config(env={}).server.workers == 1
    toml = tmp_path / "mlxgate.toml"
    toml.write_text("[server]\nworkers = 3\n")
    assert load_config(toml, env={}).server.workers == 3
    assert load_config(toml, env={"MLXGATE_WORKERS": "2"}).server.workers == 2
    args = build_parser().parse_args(["serve", "--workers", "4"])
    assert config_from_args(args).server.workers == 4
    with pytest.raises(ValueError, match="workers must be at least 1"):
        load_config(env={"MLXGATE_WORKERS": "0"})
    with pytest.raises(ValueError, match="cannot be combined with grpc_target"):
        load_config(env={"MLXGATE_WORKERS": "2", "MLXGATE_GRPC_TARGET": "h:1"})
