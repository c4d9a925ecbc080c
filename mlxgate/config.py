"""The one configuration object and the table of every setting.

Each setting is declared once, here: its field, with its environment
variables, its flag, its default and its help (``mlxgate.settings.setting``).
``mlxgate/config_load.py`` builds a ``Config`` from defaults < TOML file <
environment < flags; ``mlxgate_cli/flags.py`` builds the flags from the same
declarations, and README.md's configuration table is generated from them.
Every ``MLXGATE_*`` variable is spelled in this module only: other modules
name one with ``env_var("section.field")`` or the constants below.

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

    [hub]                                   # where `pull` downloads from (HF_ENDPOINT, HF_TOKEN)
    endpoint = "https://huggingface.co"

    [catalog]                               # Ollama-style names `pull` knows, besides the shipped catalog
    "phi4:mini" = "mlx-community/Phi-4-mini-instruct-4bit"

    [[cloud.providers]]
    name = "openrouter"
    base_url = "https://openrouter.ai/api/v1"
    api_key_env = "OPENROUTER_API_KEY"
    models = ["meta-llama/llama-3.1-8b-instruct"]

    [[remote]]
    name = "studio2"
    target = "studio2.lan:50051"
    key_env = "MLXGATE_STUDIO2_KEY"

    [[cloud.providers]]
    name = "claude"
    kind = "anthropic"                      # Anthropic's Messages API ("openai" is the default)
    base_url = "https://api.anthropic.com"
    api_key_env = "ANTHROPIC_API_KEY"
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from mlxgate.durations import parse_duration
from mlxgate.settings import Row, Setting, rows, setting
from mlxgate.dialects.base import FETCH_IMAGE_TIMEOUT_ENV, FETCH_IMAGE_URLS_ENV, FETCH_PRIVATE_ENV

#: Variables the loader (``mlxgate/config_load.py``) reads with code of its
#: own; listed in the table by the fields they fill.
CONFIG_ENV = "MLXGATE_CONFIG"
ORIGINS_ENV = "MLXGATE_ORIGINS"
REMOTES_ENV = "MLXGATE_REMOTES"
CLOUD_MODELS_ENV = "MLXGATE_CLOUD_MODELS"
ANTHROPIC_MODELS_ENV = "MLXGATE_ANTHROPIC_MODELS"
#: The key the client verbs and ``mlxgate usage`` send (``mlxgate_cli/client/host.py``);
#: the server they call is where ``server.host`` / ``server.port``'s variables say.
CLIENT_KEY_ENV = "MLXGATE_API_KEY"

_SECURITY = "[Security](#security-who-may-call)"
_UPSTREAM_DEFAULT = "the `[upstream]` value"


@dataclass
class ServerConfig:
    host: str = setting("127.0.0.1", env=("MLXGATE_HOST",), also=("OLLAMA_HOST",), flag="--host",
                        commands=("serve",), help="HTTP bind address")
    port: int = setting(11434, env=("MLXGATE_PORT",), also=("OLLAMA_HOST",), flag="--port", commands=("serve",),
                        help="HTTP port, 0 for any free one")
    grpc_host: str = setting("127.0.0.1", env=("MLXGATE_GRPC_HOST",), flag="--grpc-host", metavar="HOST",
                             help="gRPC bind address")
    grpc_port: int = setting(50051, env=("MLXGATE_GRPC_PORT",), flag="--grpc-port", metavar="PORT",
                             help="gRPC port, 0 for any free one")
    grpc_target: Optional[str] = setting(
        None, env=("MLXGATE_GRPC_TARGET",), flag="--grpc-target", commands=("serve",), metavar="HOST:PORT",
        help="run only the HTTP front, calling the inference service at host:port instead of starting one")
    request_timeout: float = setting(600.0, env=("MLXGATE_REQUEST_TIMEOUT",),
                                     help="deadline, in seconds, the front puts on each call to the inference service")
    max_body_bytes: int = setting(32 * 1024 * 1024, env=("MLXGATE_MAX_BODY_BYTES",),
                                  help="largest HTTP request body (413 beyond)")
    #: Bounds what a client that connects and stalls holds.
    http_idle_timeout: float = setting(
        75.0, env=("MLXGATE_HTTP_IDLE_TIMEOUT",),
        help="seconds an HTTP connection may go without a whole request (nothing sent, headers cut short, idle "
             "after an answer) before it is closed")
    http_body_timeout: float = setting(
        60.0, env=("MLXGATE_HTTP_BODY_TIMEOUT",),
        help="seconds a request's body may take to arrive once its headers did (408 beyond)")
    #: A little above max_body_bytes, so whatever the HTTP front accepts still fits in one message.
    grpc_max_message_bytes: int = setting(
        36 * 1024 * 1024,
        help="largest gRPC message, either way, on the service and the front's channel (see [gRPC](#grpc))")
    #: ``mlxgate.grpc_tls``
    grpc_tls_cert: str = setting(
        "", env=("MLXGATE_GRPC_TLS_CERT",),
        help="PEM certificate (chain): the service's gRPC TCP port speaks TLS (with `server.grpc_tls_key`: both "
             "or neither; see [gRPC](#grpc))")
    grpc_tls_key: str = setting("", env=("MLXGATE_GRPC_TLS_KEY",),
                                help="the PEM private key of `server.grpc_tls_cert`")
    grpc_tls_ca: str = setting(
        "", env=("MLXGATE_GRPC_TLS_CA",),
        help="PEM roots (a CA, or a self-signed service's certificate): the front's channel to `--grpc-target` "
             "and to remote services uses TLS, checked against them (a `[[remote]]` entry's `tls_ca` overrides it)")
    metrics_port: int = setting(
        9464, env=("MLXGATE_METRICS_PORT",), flag="--metrics-port", commands=("service",), metavar="PORT",
        help="`/metrics` of a stand-alone `mlxgate service` (bound on the gRPC host, keyed like the front)")
    #: Every HTTP route but ``GET /`` and ``HEAD /`` then needs one (``Authorization:
    #: Bearer <key>`` or ``x-api-key``), and every InferenceService gRPC method
    #: ``authorization: Bearer <key>``; named ``key-1``, ... (``mlxgate/keyring.py``).
    api_keys: list[str] = setting(
        default_factory=list, repr=False, env=("MLXGATE_API_KEYS",), flag="--api-key", metavar="KEY",
        help=f"API keys; when any is set, callers must send one (see {_SECURITY})")
    #: ``mlxgate/admin.py`` lists what only they may do.
    admin_keys: list[str] = setting(
        default_factory=list, repr=False, env=("MLXGATE_ADMIN_KEYS",), flag="--admin-key", metavar="KEY",
        help="keys that may also manage models (pull, create, copy, delete, blobs, push) and read "
             "`/api/usage`; valid wherever an API key is; setting only admin keys also makes every route but "
             "`GET /` need a key")
    #: Their secrets are resolved from ``key_env`` at load.
    keys: list["KeyEntry"] = setting(
        default_factory=list, repr=False, toml="[[keys]]",
        help="named keys, each with its own limits, models and `admin` flag (see [What cloud fallback costs]"
             "(#what-cloud-fallback-costs-usage-budgets-per-key-limits))")
    metrics_public: bool = setting(False, env=("MLXGATE_METRICS_PUBLIC",),
                                   help="serve `/metrics` without a key even when keys are set")
    allow_unauthenticated: bool = setting(
        False, env=("MLXGATE_ALLOW_UNAUTHENTICATED",), flag="--allow-unauthenticated",
        help="allow a non-loopback bind address without keys")
    #: The DNS-rebinding guard (``gateway/security.py``).
    allowed_hosts: list[str] = setting(
        default_factory=list, env=("MLXGATE_ALLOWED_HOSTS",),
        help="`Host` names accepted besides the loopback ones (`*.example.lan` for sub-domains)")
    origins: list[str] = setting(
        default_factory=list, also=(ORIGINS_ENV, "OLLAMA_ORIGINS"),
        help="browser origins allowed besides the defaults, Ollama's pattern syntax (`*` "
             "wildcards); the TOML list and both variables add up")
    shutdown_grace: float = setting(
        30.0, env=("MLXGATE_SHUTDOWN_GRACE",),
        help="seconds requests in flight may run on after SIGTERM/SIGINT (see [Shutdown](#shutdown))")
    front_channel: str = setting(
        "in-process", env=("MLXGATE_FRONT_CHANNEL",),
        help="how `mlxgate serve`'s HTTP front reaches its own service: `in-process` calls the service's gRPC "
             "handlers directly with the same messages, keys, deadlines, cancellation, statuses and size limits "
             "(saves ~40 % of the CPU per request); `grpc` goes over the loopback gRPC port, "
             "as a front in another process does")
    #: N > 1: ``mlxgate_cli/workers.py``, each worker calling the parent's
    #: service over a private Unix-domain gRPC socket.
    workers: int = setting(
        1, env=("MLXGATE_WORKERS",), flag="--workers", commands=("serve",), metavar="N",
        help="HTTP front processes of `mlxgate serve` sharing the HTTP port, in front of the one inference service "
             "(see [HTTP workers](#http-workers)); `1`: front and service in one process, as "
             "`server.front_channel` says")
    data_dir: Optional[str] = setting(
        None, env=("MLXGATE_DATA_DIR",), flag="--data-dir", metavar="DIR",
        shown_default="the user data folder (`~/.local/share/mlxgate`, `~/Library/Application Support/mlxgate`)",
        help="mlxgate's own data: stored responses (`responses.sqlite3`, see [Stored responses](#stored-responses)), "
             "the usage ledger, and the generated test model served when there are no models (`make run`: "
             "`.mlxgate-data`)")
    #: ``<data_dir>/responses.sqlite3``
    responses_max_count: int = setting(
        10_000, env=("MLXGATE_RESPONSES_MAX_COUNT",),
        help="most responses the Responses API keeps; the oldest are removed first")
    responses_max_bytes: int = setting(
        256 * 1024 * 1024, env=("MLXGATE_RESPONSES_MAX_BYTES",),
        help="most bytes they take (responses and their input items); the oldest are removed first")
    fetch_image_urls: bool = setting(
        False, env=(FETCH_IMAGE_URLS_ENV,),
        help="fetch the http(s) image URLs callers send (OpenAI `image_url`, Responses `input_image`, Anthropic "
             "`url` sources), bounded in size, time and redirects; off, they are 400 naming this setting")
    fetch_private: bool = setting(
        False, env=(FETCH_PRIVATE_ENV,),
        help="let those fetches reach loopback, private, link-local and other non-public addresses (off: "
             "refused, against SSRF)")
    fetch_image_timeout: float = setting(
        10.0, env=(FETCH_IMAGE_TIMEOUT_ENV,),
        help="seconds the image URLs of one request may take together (connect, redirects, bodies); 400 beyond")

    def __post_init__(self) -> None:
        # Sent to ``serve --workers``' processes as plain dicts (dataclasses.asdict).
        self.keys = [KeyEntry(**k) if isinstance(k, Mapping) else k for k in self.keys]

    def data_path(self) -> Path:
        """``data_dir``, or the platform's user data folder for mlxgate
        (platformdirs: ``~/.local/share/mlxgate`` on Linux,
        ``~/Library/Application Support/mlxgate`` on macOS)."""
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        import platformdirs

        return Path(platformdirs.user_data_dir("mlxgate", appauthor=False))


@dataclass
class KeyEntry:
    """One ``[[keys]]`` entry: a named API key and its limits (None: none).

    The secret comes from ``key_env`` (the name of an environment variable,
    preferred: the key never sits in a file) or ``key``; the name is what
    the ledger, logs, metrics and ``/api/usage`` show, never the secret."""

    name: str = ""
    key_env: str = ""
    key: str = field(default="", repr=False)
    admin: bool = False
    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    cloud_usd_per_day: Optional[float] = None
    #: Models this key may use (public names); empty: any.
    models: list[str] = field(default_factory=list)


#: ``ServerConfig.front_channel``'s values.
FRONT_CHANNELS = ("in-process", "grpc")

#: KV-cache quantization: the bits and group sizes MLX's quantized attention takes.
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
#: The keys of a model's own table, ``[mlx.models."<name>"]``.
MLX_MODEL_KEYS = ("kv_bits", "kv_group_size", "kv_quant_start")


@dataclass(frozen=True)
class KVCacheSettings:
    """How one model's KV cache is kept (``MLXConfig.kv_cache_for``)."""

    #: Bits per value (4 or 8); None: full precision.
    bits: Optional[int] = None
    group_size: int = 64
    #: Positions a batch's cache holds at full precision before it is quantized.
    quant_start: int = 0


@dataclass
class MLXConfig:
    models_dir: str = setting("~/.mlx_models", env=("MLXGATE_MODELS_DIR",), also=("OLLAMA_MODELS",),
                              flag="--models-dir", metavar="DIR",
                              help="one MLX model per subfolder (`make run`: `.models`)")
    hf_cache: Optional[str] = setting(None, env=("MLXGATE_HF_CACHE",),
                                      shown_default="`~/.cache/huggingface/hub` if present",
                                      help="Hugging Face cache scanned for MLX models")
    #: The least recently used is evicted.
    max_loaded_models: int = setting(2, env=("MLXGATE_MAX_LOADED_MODELS", "OLLAMA_MAX_LOADED_MODELS"),
                                     help="resident MLX models; the least recently used is evicted")
    default_keep_alive: float = setting(
        300.0, env=("MLXGATE_KEEP_ALIVE", "OLLAMA_KEEP_ALIVE"), parse=parse_duration,
        help="default keep_alive in seconds or Go durations (`10m`, `1h`; Ollama semantics: negative keeps "
             "models loaded)")
    default_max_tokens: int = setting(
        -1, env=("MLXGATE_DEFAULT_MAX_TOKENS",),
        help="most tokens an MLX answer may have when the request sets no limit (Ollama's `num_predict`, "
             "OpenAI's `max_tokens`, gRPC `max_tokens` unset); `-1`: until a stop or the context is full, "
             "Ollama's default")
    #: Continuous batching.
    max_batch_size: int = setting(16, env=("MLXGATE_MAX_BATCH_SIZE", "OLLAMA_NUM_PARALLEL"),
                                  help="sequences decoded together (continuous batching)")
    #: RESOURCE_EXHAUSTED beyond (Ollama's OLLAMA_MAX_QUEUE, same default).
    max_pending: int = setting(
        512, env=("MLXGATE_MAX_PENDING", "OLLAMA_MAX_QUEUE"),
        help="requests queued or running in the MLX engine before new ones get \"server busy\"; the router then "
             "tries the next backend")
    prefill_step_size: int = setting(512, help="most prompt tokens of one sequence evaluated in one step")
    #: Running streams' tokens are never more than ~(1 + this) times their usual gap apart.
    prefill_interleave: float = setting(
        1.25, env=("MLXGATE_PREFILL_INTERLEAVE",),
        help="while streams decode, a new prompt is prefilled in chunks of about this many decode steps' time "
             "each, so their tokens keep coming (a gap about 2.25× the usual, at most ~3×); larger: the prompt's "
             "first token sooner, longer gaps; `0`: chunks of "
             "`mlx.prefill_step_size` tokens, streams wait for each")
    #: ``backends/mlx/mixed.py``; off only to measure what it gains.
    fused_prefill: bool = setting(
        True, env=("MLXGATE_FUSED_PREFILL",),
        help="while streams decode, a prompt's prefill chunk and their decode step run as one forward pass "
             "(Llama, Mistral and Qwen2/3 text models): the chunk does not pay a pass of its own; off also turns off "
             "the split decode attention for rows of very different lengths (`ragged.py`), which rides on it")
    #: Per process, all models together.
    prompt_cache_bytes: int = setting(
        512 * 1024 * 1024, env=("MLXGATE_PROMPT_CACHE_BYTES",),
        help="KV caches of finished sequences kept for prompt reuse (multi-turn chats, shared system prompts); "
             "0 turns reuse off")
    #: Never written into models_dir (``backends.mlx.bootstrap``).
    bootstrap_test_model: bool = setting(
        True, help="when no MLX model is found, serve the small generated test model from "
                   "`<data_dir>/test-models`, writing it there the first time")
    #: A folder of generated test models scanned after models_dir; set at
    #: start-up when the bootstrap above applies (None: not scanned).
    test_models_dir: Optional[str] = None
    enabled: bool = setting(
        True, env=("MLXGATE_MLX_ENABLED",),
        help="the local MLX engine; off: none (MLX is not even imported), a gateway to remote services, Ollama and "
             "cloud upstreams only")
    #: ``backends/mlx/distributed/``
    distributed: bool = setting(
        False, env=("MLXGATE_DISTRIBUTED",), flag="--distributed",
        help="one model over the processes `mlx.launch` starts: rank 0 serves, the others hold their shards and "
             "follow (see [One model across several Macs](#one-model-across-several-macs---distributed))")
    pipeline: bool = setting(
        False, env=("MLXGATE_PIPELINE",), flag="--pipeline",
        help="with `--distributed`: split the layers across the ranks (pipeline parallelism) instead of every "
             "layer (tensor parallelism), for the model types mlx-lm can pipeline")
    #: Heartbeats go on a side channel every 0.5 s.
    distributed_timeout: float = setting(
        5.0, env=("MLXGATE_DISTRIBUTED_TIMEOUT",),
        help="with `--distributed`: seconds a rank may miss its heartbeats before the engine goes out of service")
    kv_bits: Optional[int] = setting(
        None, env=("MLXGATE_KV_BITS",),
        help="quantize the KV cache of the running batch and of the prompt-cache store to this many bits (8 or 4; "
             "unset or 0: full precision); layers whose caches cannot be quantized stay at full precision "
             "(`backends/mlx/kv_quant.py`)")
    kv_group_size: int = setting(64, env=("MLXGATE_KV_GROUP_SIZE",),
                                 help="values per quantization group of the KV cache (32, 64 or 128)")
    kv_quant_start: int = setting(
        0, env=("MLXGATE_KV_QUANT_START",),
        help="positions a batch's KV cache holds at full precision before it is quantized")
    models: dict[str, dict[str, int]] = setting(
        default_factory=dict, toml='[mlx.models."<name>"]',
        help="a model's own `kv_bits`, `kv_group_size`, `kv_quant_start` (the name as clients use it, "
             "case-insensitive), over the defaults above")

    def kv_cache_for(self, model: str) -> KVCacheSettings:
        """``model``'s KV-cache settings: its own table over the defaults; ValueError names a bad value."""
        own = _model_table(self.models, model)
        bits = own.get("kv_bits", self.kv_bits)
        group = own.get("kv_group_size", self.kv_group_size)
        start = own.get("kv_quant_start", self.kv_quant_start)
        where = f'mlx.models."{model}"' if own else "mlx"
        if bits is not None and bits != 0 and bits not in KV_BITS:
            raise ValueError(f"{where}: kv_bits must be one of {', '.join(map(str, KV_BITS))} "
                             f"(or 0: full precision), got {bits!r}")
        if group not in KV_GROUP_SIZES:
            raise ValueError(f"{where}: kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, "
                             f"got {group!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"{where}: kv_quant_start must be 0 or more, got {start!r}")
        return KVCacheSettings(bits or None, group, start)


def _model_table(models: Mapping[str, Mapping[str, Any]], model: str) -> Mapping[str, Any]:
    """The ``[mlx.models]`` entry of ``model`` (case-insensitive, ":latest" optional); {} when none."""
    def key(name: str) -> str:
        name = name.lower()
        return name[: -len(":latest")] if name.endswith(":latest") else name

    wanted = key(model)
    return next((v for k, v in models.items() if key(k) == wanted), {})


def check_mlx_models(mlx: MLXConfig) -> None:
    """A one-line error at start for a bad KV-cache setting, the defaults' or a model's."""
    if not isinstance(mlx.models, Mapping):
        raise ValueError('mlx.models: expected [mlx.models."<name>"] tables')
    for name, table in mlx.models.items():
        if not isinstance(table, Mapping):
            raise ValueError(f'mlx.models."{name}": expected a table of {", ".join(MLX_MODEL_KEYS)}')
        unknown = sorted(set(table) - set(MLX_MODEL_KEYS))
        if unknown:
            raise ValueError(f'mlx.models."{name}": unknown key(s) {", ".join(unknown)} '
                             f"(known: {', '.join(MLX_MODEL_KEYS)})")
        mlx.kv_cache_for(name)
    mlx.kv_cache_for("")


@dataclass
class UpstreamTimeouts:
    """Clocks on a call to an upstream (Ollama, a cloud API, a remote
    service), in seconds.  Keep-alive lines and SSE comments do not reset the
    token clocks.  The ``[upstream]`` section gives the defaults; each
    upstream may set its own.
    """

    connect_timeout: float = setting(
        10.0, env=("MLXGATE_CONNECT_TIMEOUT",),
        help="seconds to connect to an upstream (Ollama, a cloud API, a remote service); the default of each")
    first_token_timeout: float = setting(
        120.0, env=("MLXGATE_FIRST_TOKEN_TIMEOUT",),
        help="seconds from sending a request upstream to its first token (headers and keep-alives do not count); "
             "also bounds a whole unary call, with the connect time")
    idle_timeout: float = setting(60.0, env=("MLXGATE_IDLE_TIMEOUT",),
                                  help="seconds an upstream may go between two tokens")


@dataclass
class OllamaConfig:
    upstream: Optional[str] = setting(
        None, env=("OLLAMA_UPSTREAM",), flag="--ollama-upstream", metavar="URL",
        help="upstream Ollama to fall back to, e.g. `http://otherbox:11434`")
    #: None: the ``[upstream]`` default (filled in by load_config).
    connect_timeout: Optional[float] = setting(None, shown_default=_UPSTREAM_DEFAULT,
                                               help="`upstream.connect_timeout` for the upstream Ollama")
    first_token_timeout: Optional[float] = setting(None, shown_default=_UPSTREAM_DEFAULT,
                                                   help="`upstream.first_token_timeout` for it")
    idle_timeout: Optional[float] = setting(None, shown_default=_UPSTREAM_DEFAULT,
                                            help="`upstream.idle_timeout` for it")


#: The APIs a cloud provider may speak: "openai" (OpenAI-compatible chat
#: completions; base_url ends with /v1) or "anthropic" (Anthropic's Messages
#: API; base_url is the API root, as ANTHROPIC_BASE_URL: https://api.anthropic.com).
CLOUD_KINDS = ("openai", "anthropic")


@dataclass
class CloudProvider:
    name: str
    base_url: str
    #: Name of the environment variable that holds the key (never the key).
    api_key_env: str = ""
    #: The API it speaks: one of CLOUD_KINDS.
    kind: str = "openai"
    #: Models to offer from this provider; empty = ask its /models.
    models: list[str] = field(default_factory=list)
    #: None: the ``[upstream]`` default (filled in by load_config).
    connect_timeout: Optional[float] = None
    first_token_timeout: Optional[float] = None
    idle_timeout: Optional[float] = None
    #: USD per million tokens by model ("*": any other): [input, output] or
    #: [input, output, cached input] (``backends/spend/prices.py``).
    prices: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in CLOUD_KINDS:
            raise ValueError(
                f"cloud provider {self.name!r}: kind must be one of {', '.join(CLOUD_KINDS)}, got {self.kind!r}"
            )
        for model, price in self.prices.items():
            if (not isinstance(price, list) or len(price) not in (2, 3)
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in price)):
                raise ValueError(f"cloud provider {self.name!r}: prices[{model!r}] must be [input, output] or "
                                 "[input, output, cached input], USD per million tokens, none negative")


@dataclass
class CloudConfig:
    providers: list[CloudProvider] = setting(
        default_factory=list, toml="[[cloud.providers]]",
        also=("OPENAI_BASE_URL", "OPENAI_API_KEY", CLOUD_MODELS_ENV, "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY",
              ANTHROPIC_MODELS_ENV),
        help="cloud providers, each a backend `cloud:<name>` (see [Cloud providers](#cloud-providers)); "
             "`OPENAI_BASE_URL` / `OPENAI_API_KEY` add one named `openai`, its models from "
             f"`{CLOUD_MODELS_ENV}` (comma-separated; default: ask its `/models`); `ANTHROPIC_BASE_URL` / "
             "`ANTHROPIC_API_KEY` one named `anthropic` (`kind = \"anthropic\"`; the base URL is the API root, "
             f"default `https://api.anthropic.com`), its models from `{ANTHROPIC_MODELS_ENV}` (default: ask its "
             "`/v1/models`); each unless the file names one so")


@dataclass
class RemoteService:
    """Another mlxgate inference service (``mlxgate service`` on another
    machine), used as a backend named ``remote:<name>``.

    The key it wants (``authorization: Bearer``): preferably ``key_env``, the
    name of an environment variable holding it, so the key never sits in a
    file; ``key`` holds it in the file itself.  With neither, the front's own
    first API key is sent (``server.api_keys``), if it has one.
    """

    #: The backend is ``remote:<name>`` (metrics labels, x-mlxgate-backend,
    #: alias targets ``remote:<name>:<model>``); empty: the target.
    name: str = ""
    #: host:port of its gRPC port.
    target: str = ""
    key: str = field(default="", repr=False)
    key_env: str = ""
    #: PEM roots its certificate is checked against: the channel uses TLS.
    #: Empty: ``server.grpc_tls_ca`` (TLS when that is set, else plaintext).
    tls_ca: str = ""
    #: None: the ``[upstream]`` default (filled in by load_config).
    connect_timeout: Optional[float] = None
    first_token_timeout: Optional[float] = None
    idle_timeout: Optional[float] = None


@dataclass
class RouterConfig:
    retry_budget: int = setting(3, help="backends tried for one request, fallbacks included")
    breaker_failures: int = setting(3, help="consecutive failures that take a backend out ...")
    breaker_cooldown: float = setting(30.0, help="... for this many seconds, then one probe")
    model_list_ttl: float = setting(10.0, help="seconds a backend's model list is reused")
    #: Also refreshed in the background after each request it served.
    running_ttl: float = setting(
        5.0, help="placement (several engines with the model: the local one and remote services): seconds what "
                  "each has loaded is reused before it is asked again")
    #: The warm/cold preference is then dropped and the least loaded engine
    #: that has the model takes the next one (loading it there), so sustained
    #: concurrent traffic grows onto more machines.
    spill_at: int = setting(
        8, help="placement: requests of this front in flight on every warm engine before a cold one loads the "
                "model; `0`: a cold engine only when no warm one serves")


@dataclass
class HubConfig:
    """Where ``pull`` downloads models from: a Hugging Face Hub
    (``backends/models/hub.py``).  HF_ENDPOINT and HF_TOKEN, the hub
    clients' own variables, are read here once."""

    endpoint: str = setting("https://huggingface.co", env=("HF_ENDPOINT",),
                            help="the hub `pull` downloads from (a mirror works)")
    #: Sent as a Bearer header to ``endpoint`` only, never logged.
    token: str = setting("", repr=False, env=("HF_TOKEN",), help="a hub token, for gated and private repos")
    connect_timeout: float = setting(10.0, help="seconds to open a connection to the hub")
    idle_timeout: float = setting(60.0, help="seconds a listing or a download may go without receiving a byte")
    #: A larger repo is refused before any download.
    max_files: int = setting(2000, help="most entries a repo's file listing may have")
    max_repo_bytes: int = setting(512 * 1024**3, help="most bytes a repo's model files may add up to")
    reserve_bytes: int = setting(1024**3, help="bytes that must stay free on the models' disk after a pull")
    max_concurrent_pulls: int = setting(
        2, help="downloads (of different models) running at once; more pulls wait for one to end")


@dataclass
class BudgetConfig:
    """``[budget]``: reached, cloud backends are skipped until the period
    resets (``backends/spend/budgets.py``)."""

    cloud_usd_per_day: Optional[float] = setting(
        None, env=("MLXGATE_CLOUD_BUDGET_DAY_USD",), shown_default="no limit",
        help="most cloud spend per day, USD")
    cloud_usd_per_month: Optional[float] = setting(
        None, env=("MLXGATE_CLOUD_BUDGET_MONTH_USD",), shown_default="no limit",
        help="most cloud spend per month, USD")
    timezone: str = setting("UTC", help="where days and months begin (an IANA name such as `Europe/Berlin`)")


@dataclass
class UsageConfig:
    """``[usage]``: the ledger (``<data_dir>/usage.sqlite3``)."""

    ledger: bool = setting(True, env=("MLXGATE_USAGE_LEDGER",),
                           help="record a row per request; off, budgets count from the start of the process")
    retention_days: float = setting(90.0, env=("MLXGATE_USAGE_RETENTION_DAYS",),
                                    help="ledger rows older than this many days are removed")


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    mlx: MLXConfig = field(default_factory=MLXConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    remotes: list[RemoteService] = setting(
        default_factory=list, toml="[[remote]]", also=(REMOTES_ENV,),
        help="other `mlxgate service`s, each a backend `remote:<name>`; the variable: comma-separated `host:port` "
             "(backend `remote:host:port`) or `name=host:port` (backend `remote:name`), added to the TOML entries; "
             "they get the front's first API key (see [Several Macs](#several-macs-behind-one-gateway))")
    router: RouterConfig = field(default_factory=RouterConfig)
    upstream: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    aliases: dict[str, list[str]] = setting(
        default_factory=dict, toml="[aliases]",
        help="public name = ordered targets `mlx:<name>`, `ollama:<tag>`, `remote:<name>:<model>`, "
             "`cloud:<provider>:<model>` (see [Routing and fallback](#routing-and-fallback))")
    hub: HubConfig = field(default_factory=HubConfig)
    catalog: dict[str, str] = setting(
        default_factory=dict, toml="[catalog]",
        help="Ollama-style name = `\"owner/repo[:revision]\"` on the hub, added to (and overriding) the catalog "
             "shipped with mlxgate (see [Getting models](#getting-models))")
    log_level: str = setting("INFO", env=("MLXGATE_LOG_LEVEL",), flag="--log-level", metavar="LEVEL",
                             help="DEBUG, INFO, WARNING or ERROR")
    #: What loading noticed and the user should read (logged at start-up):
    #: an ignored OLLAMA_MODELS, a deprecated key, ...
    notes: list[str] = field(default_factory=list)

    def models_path(self) -> Path:
        return Path(self.mlx.models_dir).expanduser()

    def data_path(self) -> Path:
        """``server.data_dir``, or the platform's user data folder (``ServerConfig.data_path``)."""
        return self.server.data_path()


#: ``--config`` / MLXGATE_CONFIG: the one setting that is not a field.
CONFIG_FILE = Row("", Setting(help="TOML file with any of the settings below", env=(CONFIG_ENV,), flag="--config",
                              metavar="FILE"))

#: Every setting: README.md's table, the flags, ``env_var``.
TABLE: list[Row] = [CONFIG_FILE, *rows(Config)]


def env_var(key: str) -> str:
    """The (first) environment variable of the setting ``key`` ("server.api_keys"),
    for messages that tell a person what to set."""
    for row in TABLE:
        if row.key == key and row.variables:
            return row.variables[0]
    raise KeyError(f"no environment variable sets {key!r}")


def parse_ollama_host(value: str) -> tuple[str, Optional[int]]:
    """OLLAMA_HOST: "host", "host:port", ":port", with an optional scheme, IPv6 in brackets."""
    v = value.strip()
    v = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", v).rstrip("/")
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif v.count(":") == 1:
        host, _, port = v.partition(":")
    else:
        host, port = v, ""
    if port and not port.isdigit():
        raise ValueError(f"OLLAMA_HOST: bad port in {value!r}")
    return host or "127.0.0.1", int(port) if port else None


def resolved_timeouts(upstream: Any) -> UpstreamTimeouts:
    """An upstream's timeouts with the unset ones at the built-in defaults
    (load_config has already filled them from ``[upstream]``)."""
    base = UpstreamTimeouts()
    return UpstreamTimeouts(
        **{
            f.name: getattr(base, f.name) if getattr(upstream, f.name) is None else getattr(upstream, f.name)
            for f in dataclasses.fields(UpstreamTimeouts)
        }
    )
