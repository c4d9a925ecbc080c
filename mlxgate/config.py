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
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from mlxgate.durations import parse_duration  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


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
    #: Seconds an HTTP connection may stay without a whole request (its
    #: headers not all there yet, or idle between requests) before it is
    #: closed: bounds what a client that connects and stalls holds.
    http_idle_timeout: float = 75.0
    #: Seconds a request's body may take to arrive, once its headers did
    #: (408 beyond).
    http_body_timeout: float = 60.0
    #: Largest gRPC message the service receives or sends (and the front's
    #: channel), in bytes: a little above max_body_bytes, so whatever the HTTP
    #: front accepts still fits in one message.
    grpc_max_message_bytes: int = 36 * 1024 * 1024
    #: TLS on the service's gRPC TCP port: a PEM certificate (chain) and its
    #: private key, both or neither (``mlxgate.grpc_tls``).
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    #: PEM roots (a CA, or a self-signed service's own certificate) that the
    #: front's channel to ``grpc_target`` and remote services without their
    #: own ``tls_ca`` check the service against; set: those channels use TLS.
    grpc_tls_ca: str = ""
    #: Port for /metrics when only the inference service runs (``mlxgate service``).
    metrics_port: int = 9464
    #: API keys.  When any is set, every HTTP route but ``GET /`` and ``HEAD /``
    #: needs one (``Authorization: Bearer <key>`` or ``x-api-key``), and every
    #: InferenceService gRPC method needs ``authorization: Bearer <key>``.
    api_keys: list[str] = field(default_factory=list, repr=False)
    #: Admin keys: valid wherever an API key is, and the only keys that may
    #: read ``/api/usage`` and manage models (pull, create, copy, delete,
    #: blobs, push: ``mlxgate/admin.py``) once any key is set.  Setting only
    #: admin keys also makes every route but ``GET /`` need a key.
    admin_keys: list[str] = field(default_factory=list, repr=False)
    #: Named keys (TOML ``[[keys]]``), each with its own limits
    #: (``mlxgate.keyring``); their secrets resolved from ``key_env`` at load.
    keys: list["KeyEntry"] = field(default_factory=list, repr=False)
    #: Serve /metrics without a key even when keys are set.
    metrics_public: bool = False
    #: Start on a non-loopback address with no keys (refused otherwise).
    allow_unauthenticated: bool = False
    #: Host header values accepted besides the loopback names (DNS-rebinding guard).
    allowed_hosts: list[str] = field(default_factory=list)
    #: Browser origins allowed besides the defaults (OLLAMA_ORIGINS and
    #: MLXGATE_ORIGINS add up), Ollama's pattern syntax ("*" wildcards).
    origins: list[str] = field(default_factory=list)
    #: Seconds in-flight requests may run after SIGTERM/SIGINT before they are ended.
    shutdown_grace: float = 30.0
    #: How the HTTP front of ``mlxgate serve`` reaches the service of its own
    #: process: "in-process" (the service's handlers called directly with the
    #: same messages, ``backends/local.py``) or "grpc" (a loopback gRPC
    #: channel, as a front in another process uses).
    front_channel: str = "in-process"
    #: HTTP front processes of ``mlxgate serve``: 1 runs the front in the
    #: service's process (``front_channel``); N > 1 runs N worker processes
    #: sharing the one HTTP listening socket, each calling the service of
    #: the parent process over a private Unix-domain gRPC socket
    #: (``mlxgate_cli/workers.py``).
    workers: int = 1
    #: Where mlxgate keeps its own data (stored responses, the generated
    #: test model when no models are found); None = the platform's user data
    #: folder for mlxgate.
    data_dir: Optional[str] = None
    #: The Responses API's store (``<data_dir>/responses.sqlite3``): most
    #: responses kept, and most bytes (responses and their input items
    #: together); beyond either, the oldest are removed first.
    responses_max_count: int = 10_000
    responses_max_bytes: int = 256 * 1024 * 1024

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
    models_dir: str = "~/.mlx_models"
    #: Hugging Face hub cache; scanned for mlx models when it exists.
    hf_cache: Optional[str] = None
    #: Most models resident at once; the least recently used is evicted.
    max_loaded_models: int = 2
    #: Ollama's default keep_alive, seconds.
    default_keep_alive: float = 300.0
    #: Tokens to generate when a request sets no limit; -1 (Ollama's
    #: num_predict default) = until a stop or the context is full.
    default_max_tokens: int = -1
    #: Sequences decoded together in one step (continuous batching).
    max_batch_size: int = 16
    #: Requests queued or running before new ones are refused with
    #: RESOURCE_EXHAUSTED (Ollama's OLLAMA_MAX_QUEUE, same default).
    max_pending: int = 512
    #: Most prompt tokens of one sequence evaluated in one step.
    prefill_step_size: int = 512
    #: While other sequences are generating, a step evaluates only as much of
    #: a new prompt as takes about this many decode steps' time, so running
    #: streams' tokens are never more than ~(1 + this) times their usual gap
    #: apart; 0 = always prefill_step_size (streams wait for each chunk).
    prefill_interleave: float = 1.5
    #: Bytes of finished sequences' KV caches kept per process (all models
    #: together) so a prompt sharing a prefix with an earlier one (the next
    #: turn of a chat, a repeated system prompt) skips that part of prefill;
    #: 0 turns prompt-cache reuse off.
    prompt_cache_bytes: int = 512 * 1024 * 1024
    #: When no MLX model is found (models_dir, the Hugging Face cache), serve
    #: the small generated test model from ``<data_dir>/test-models``, writing
    #: it there the first time, so a fresh box has something to serve; never
    #: written into models_dir (``backends.mlx.bootstrap``).
    bootstrap_test_model: bool = True
    #: A folder of generated test models scanned after models_dir; set at
    #: start-up when the bootstrap above applies (None: not scanned).
    test_models_dir: Optional[str] = None
    #: Set false to run without the MLX engine (gateway to Ollama/cloud only).
    enabled: bool = True
    #: One model over several processes started with ``mlx.launch``
    #: (``backends/mlx/distributed/``): rank 0 serves, the others follow.
    distributed: bool = False
    #: With ``distributed``: pipeline parallelism (layers split across ranks)
    #: instead of tensor parallelism (every layer split); for the model types
    #: mlx-lm can pipeline.
    pipeline: bool = False
    #: With ``distributed``: seconds a rank may go without a heartbeat (on a
    #: side channel, every 0.5 s) before rank 0 takes the engine out of service.
    distributed_timeout: float = 5.0
    #: Quantize the KV cache of the running batch and of the prompt-cache
    #: store to this many bits (8 or 4; None or 0: full precision), in groups
    #: of ``kv_group_size`` values, once a batch holds more than
    #: ``kv_quant_start`` positions (``backends/mlx/kv_quant.py``).
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    kv_quant_start: int = 0
    #: A model's own settings (TOML ``[mlx.models."<name>"]``, the name as
    #: clients use it, case-insensitive): any of MLX_MODEL_KEYS.
    models: dict[str, dict[str, int]] = field(default_factory=dict)

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


def _check_mlx_models(mlx: MLXConfig) -> None:
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
    """Clocks on a call to an upstream (Ollama, a cloud API), in seconds.

    ``connect``: to open the connection.  ``first_token``: from sending the
    request to the first token (or the whole answer of a unary call).
    ``idle``: between two tokens.  Keep-alive lines and SSE comments do not
    reset the token clocks.  The ``[upstream]`` section (env
    MLXGATE_CONNECT_TIMEOUT, MLXGATE_FIRST_TOKEN_TIMEOUT, MLXGATE_IDLE_TIMEOUT)
    gives the defaults; each upstream may set its own.
    """

    connect_timeout: float = 10.0
    first_token_timeout: float = 120.0
    idle_timeout: float = 60.0


@dataclass
class OllamaConfig:
    #: Base URL of an upstream Ollama, e.g. http://otherbox:11434; None = off.
    upstream: Optional[str] = None
    #: None: the ``[upstream]`` default (filled in by load_config).
    connect_timeout: Optional[float] = None
    first_token_timeout: Optional[float] = None
    idle_timeout: Optional[float] = None


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
    providers: list[CloudProvider] = field(default_factory=list)


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
    #: Backends tried for one request, fallbacks included.
    retry_budget: int = 3
    #: Consecutive failures that open a backend's circuit ...
    breaker_failures: int = 3
    #: ... and how long it then stays out before a probe, seconds.
    breaker_cooldown: float = 30.0
    #: How long a backend's model list is reused, seconds.
    model_list_ttl: float = 10.0
    #: Placement (several engines with the model: the local one and remote
    #: services): how long what each has loaded is reused before it is asked
    #: again, seconds.  It is also refreshed in the background after each
    #: request it served.
    running_ttl: float = 5.0
    #: Placement: when every serving engine that has the model loaded already
    #: has this many of this router's requests in flight, the warm/cold
    #: preference is dropped and the least loaded engine that has the model
    #: takes the next one (loading it there), so sustained concurrent traffic
    #: grows onto more machines.  0: never (a cold engine only when no warm
    #: one serves).
    spill_at: int = 8


@dataclass
class HubConfig:
    """Where ``pull`` downloads models from: a Hugging Face Hub
    (``backends/models/hub.py``).  HF_ENDPOINT and HF_TOKEN, the hub
    clients' own variables, are read here once."""

    #: The hub's base URL (HF_ENDPOINT).
    endpoint: str = "https://huggingface.co"
    #: A token for gated and private repos (HF_TOKEN); sent as a Bearer
    #: header to ``endpoint`` only, never logged.
    token: str = field(default="", repr=False)
    #: Seconds to open a connection to the hub, and seconds a listing or a
    #: download may go without receiving a byte.
    connect_timeout: float = 10.0
    idle_timeout: float = 60.0
    #: Most entries a repo's file listing may have, and most bytes its model
    #: files may add up to: a larger repo is refused before any download.
    max_files: int = 2000
    max_repo_bytes: int = 512 * 1024**3
    #: Bytes that must stay free on the models' disk after a pull.
    reserve_bytes: int = 1024**3
    #: Downloads (of different models) running at once; more pulls wait for one to end.
    max_concurrent_pulls: int = 2


@dataclass
class BudgetConfig:
    """``[budget]``: the most cloud spend per UTC (or ``timezone``) day and
    month, USD; None: no limit.  Reached: cloud backends are skipped until
    the period resets (``backends/spend/budgets.py``)."""

    cloud_usd_per_day: Optional[float] = None
    cloud_usd_per_month: Optional[float] = None
    #: An IANA zone name ("Europe/Berlin"): where days and months begin.
    timezone: str = "UTC"


@dataclass
class UsageConfig:
    """``[usage]``: the ledger (``<data_dir>/usage.sqlite3``)."""

    #: Record a row per request; off, budgets count from the start of the process.
    ledger: bool = True
    #: Rows older than this many days are removed.
    retention_days: float = 90.0


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    mlx: MLXConfig = field(default_factory=MLXConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    #: Other mlxgate inference services (TOML ``[[remote]]``, MLXGATE_REMOTES).
    remotes: list[RemoteService] = field(default_factory=list)
    router: RouterConfig = field(default_factory=RouterConfig)
    upstream: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    #: Public name -> ordered targets "mlx:<name>", "ollama:<tag>",
    #: "cloud:<provider>:<model>".
    aliases: dict[str, list[str]] = field(default_factory=dict)
    #: ``pull``'s hub (HF_ENDPOINT, HF_TOKEN).
    hub: HubConfig = field(default_factory=HubConfig)
    #: Ollama-style name -> "owner/repo[:revision]" on the hub, added to (and
    #: overriding) the catalog shipped with mlxgate (``backends/models/catalog.toml``).
    catalog: dict[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    #: What loading noticed and the user should read (logged at start-up):
    #: an ignored OLLAMA_MODELS, a deprecated key, ...
    notes: list[str] = field(default_factory=list)

    def models_path(self) -> Path:
        return Path(self.mlx.models_dir).expanduser()

    def data_path(self) -> Path:
        """``server.data_dir``, or the platform's user data folder (``ServerConfig.data_path``)."""
        return self.server.data_path()


# Environment variables, each mapped onto one (section, field).  List-valued
# fields take comma-separated values.
ENV_VARS: dict[str, tuple[str, str]] = {
    "MLXGATE_HOST": ("server", "host"),
    "MLXGATE_PORT": ("server", "port"),
    "MLXGATE_GRPC_HOST": ("server", "grpc_host"),
    "MLXGATE_GRPC_PORT": ("server", "grpc_port"),
    "MLXGATE_GRPC_TARGET": ("server", "grpc_target"),
    "MLXGATE_REQUEST_TIMEOUT": ("server", "request_timeout"),
    "MLXGATE_METRICS_PORT": ("server", "metrics_port"),
    "MLXGATE_API_KEYS": ("server", "api_keys"),
    "MLXGATE_ADMIN_KEYS": ("server", "admin_keys"),
    "MLXGATE_METRICS_PUBLIC": ("server", "metrics_public"),
    "MLXGATE_ALLOW_UNAUTHENTICATED": ("server", "allow_unauthenticated"),
    "MLXGATE_ALLOWED_HOSTS": ("server", "allowed_hosts"),
    "MLXGATE_SHUTDOWN_GRACE": ("server", "shutdown_grace"),
    "MLXGATE_FRONT_CHANNEL": ("server", "front_channel"),
    "MLXGATE_GRPC_TLS_CERT": ("server", "grpc_tls_cert"),
    "MLXGATE_GRPC_TLS_KEY": ("server", "grpc_tls_key"),
    "MLXGATE_GRPC_TLS_CA": ("server", "grpc_tls_ca"),
    "MLXGATE_WORKERS": ("server", "workers"),
    "MLXGATE_DATA_DIR": ("server", "data_dir"),
    "MLXGATE_MAX_BODY_BYTES": ("server", "max_body_bytes"),
    "MLXGATE_HTTP_IDLE_TIMEOUT": ("server", "http_idle_timeout"),
    "MLXGATE_HTTP_BODY_TIMEOUT": ("server", "http_body_timeout"),
    "MLXGATE_RESPONSES_MAX_COUNT": ("server", "responses_max_count"),
    "MLXGATE_RESPONSES_MAX_BYTES": ("server", "responses_max_bytes"),
    "MLXGATE_MODELS_DIR": ("mlx", "models_dir"),
    "MLXGATE_HF_CACHE": ("mlx", "hf_cache"),
    "MLXGATE_MAX_LOADED_MODELS": ("mlx", "max_loaded_models"),
    "MLXGATE_KEEP_ALIVE": ("mlx", "default_keep_alive"),
    "MLXGATE_MAX_BATCH_SIZE": ("mlx", "max_batch_size"),
    "MLXGATE_MAX_PENDING": ("mlx", "max_pending"),
    "MLXGATE_PREFILL_INTERLEAVE": ("mlx", "prefill_interleave"),
    "MLXGATE_PROMPT_CACHE_BYTES": ("mlx", "prompt_cache_bytes"),
    "MLXGATE_MLX_ENABLED": ("mlx", "enabled"),
    "MLXGATE_DEFAULT_MAX_TOKENS": ("mlx", "default_max_tokens"),
    "MLXGATE_DISTRIBUTED": ("mlx", "distributed"),
    "MLXGATE_PIPELINE": ("mlx", "pipeline"),
    "MLXGATE_DISTRIBUTED_TIMEOUT": ("mlx", "distributed_timeout"),
    "MLXGATE_KV_BITS": ("mlx", "kv_bits"),
    "MLXGATE_KV_GROUP_SIZE": ("mlx", "kv_group_size"),
    "MLXGATE_KV_QUANT_START": ("mlx", "kv_quant_start"),
    "OLLAMA_UPSTREAM": ("ollama", "upstream"),
    "HF_ENDPOINT": ("hub", "endpoint"),
    "HF_TOKEN": ("hub", "token"),
    "MLXGATE_CONNECT_TIMEOUT": ("upstream", "connect_timeout"),
    "MLXGATE_FIRST_TOKEN_TIMEOUT": ("upstream", "first_token_timeout"),
    "MLXGATE_IDLE_TIMEOUT": ("upstream", "idle_timeout"),
    "MLXGATE_CLOUD_BUDGET_DAY_USD": ("budget", "cloud_usd_per_day"),
    "MLXGATE_CLOUD_BUDGET_MONTH_USD": ("budget", "cloud_usd_per_month"),
    "MLXGATE_USAGE_RETENTION_DAYS": ("usage", "retention_days"),
    "MLXGATE_USAGE_LEDGER": ("usage", "ledger"),
}

#: Ollama's own variables, honoured for users replacing Ollama.  mlxgate's
#: variable for the same setting wins (it is applied after these), except the
#: origin lists, which add up (MLXGATE_ORIGINS and OLLAMA_ORIGINS).
OLLAMA_ENV_VARS: dict[str, tuple[str, str]] = {
    "OLLAMA_KEEP_ALIVE": ("mlx", "default_keep_alive"),
    "OLLAMA_MAX_QUEUE": ("mlx", "max_pending"),
    "OLLAMA_NUM_PARALLEL": ("mlx", "max_batch_size"),
    "OLLAMA_MAX_LOADED_MODELS": ("mlx", "max_loaded_models"),
}


def split_list(value: str) -> list[str]:
    """A comma-separated env value as a list (blanks dropped)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _coerce(value: Any, target_type: Any, name: str = "") -> Any:
    """Turn an env/flag string into the field's type."""
    t = str(target_type)
    if "list" in t:
        if isinstance(value, str):
            return split_list(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings")
        return list(value)
    if not isinstance(value, str):
        return value
    if "bool" in t:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if "int" in t:
        return int(value)
    if "float" in t:
        if name.endswith("keep_alive"):
            return parse_duration(value)
        return float(value)
    return value


def _set(section: Any, name: str, value: Any) -> None:
    types = {f.name: f.type for f in dataclasses.fields(section)}
    if name not in types:
        raise ValueError(f"unknown configuration key {type(section).__name__}.{name}")
    try:
        setattr(section, name, _coerce(value, types[name], name))
    except ValueError as e:
        raise ValueError(f"{type(section).__name__}.{name}: invalid value {value!r} ({e})") from None


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
            if not isinstance(value, list):
                raise ValueError("remote: expected [[remote]] entries (name, target, key_env or key)")
            for r in value:
                try:
                    cfg.remotes.append(RemoteService(**r))
                except TypeError as e:
                    raise ValueError(f"remote: {e}") from None
        elif key == "keys":
            if not isinstance(value, list):
                raise ValueError("keys: expected [[keys]] entries (name, key_env or key, admin, limits, models)")
            for k in value:
                try:
                    cfg.server.keys.append(KeyEntry(**k))
                except TypeError as e:
                    raise ValueError(f"keys: {e}") from None
        elif key == "log_level":
            cfg.log_level = value
        elif isinstance(value, Mapping) and hasattr(cfg, key):
            section = getattr(cfg, key)
            for name, v in value.items():
                _set(section, name, v)
        else:
            raise ValueError(f"unknown configuration key {key!r}")


def _cloud_from_env(cfg: Config, env: Mapping[str, str]) -> None:
    """OPENAI_BASE_URL / OPENAI_API_KEY give the common single provider
    ("openai"), ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY an Anthropic one
    ("anthropic"), each unless the file already names one so."""
    names = {p.name for p in cfg.cloud.providers}
    base = env.get("OPENAI_BASE_URL")
    if "openai" not in names and (base or env.get("OPENAI_API_KEY")):
        models = [m for m in env.get("MLXGATE_CLOUD_MODELS", "").split(",") if m]
        cfg.cloud.providers.append(
            CloudProvider(
                name="openai",
                base_url=base or "https://api.openai.com/v1",
                api_key_env="OPENAI_API_KEY",
                models=models,
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
                models=split_list(env.get("MLXGATE_ANTHROPIC_MODELS", "")),
            )
        )


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


def _remotes_from_env(cfg: Config, env: Mapping[str, str]) -> None:
    """MLXGATE_REMOTES=host:port,name=host:port,...: more remote services (after
    the TOML ones; a target already configured is not added twice).  A bare
    target names itself (backend ``remote:host:port``)."""
    for entry in split_list(env.get("MLXGATE_REMOTES", "")):
        name, sep, target = entry.partition("=")
        if not sep:
            name, target = "", entry
        target = target.strip()
        if any(r.target == target for r in cfg.remotes):
            continue
        cfg.remotes.append(RemoteService(name=name.strip(), target=target))


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
            raise ValueError(f"keys: name {k.name!r} is reserved for the keys of MLXGATE_API_KEYS")
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
    """Ollama's variables, applied before mlxgate's (which win)."""
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
                "which MLX cannot load; set MLXGATE_MODELS_DIR to a folder of MLX models, and OLLAMA_UPSTREAM "
                "to a running Ollama to serve those"
            )
        else:
            cfg.notes.append(f"OLLAMA_MODELS={models} is ignored: it holds no MLX model folders")
    for var, (section, name) in OLLAMA_ENV_VARS.items():
        if env.get(var):
            _set(getattr(cfg, section), name, env[var])


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


def _upstream_defaults(cfg: Config) -> None:
    """Per-upstream timeouts left unset take the ``[upstream]`` defaults."""
    targets: list[Any] = [cfg.ollama, *cfg.cloud.providers, *cfg.remotes]
    for t in targets:
        for f in dataclasses.fields(UpstreamTimeouts):
            if getattr(t, f.name) is None:
                setattr(t, f.name, getattr(cfg.upstream, f.name))


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
            try:
                table = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: {e}") from None
        _apply_table(cfg, table)
    _ollama_env(cfg, env)
    for var, (section, name) in ENV_VARS.items():
        if env.get(var):
            _set(getattr(cfg, section), name, env[var])
    # Origin lists add up: TOML, OLLAMA_ORIGINS, MLXGATE_ORIGINS.
    for var in ("OLLAMA_ORIGINS", "MLXGATE_ORIGINS"):
        for origin in split_list(env.get(var, "")):
            if origin not in cfg.server.origins:
                cfg.server.origins.append(origin)
    _cloud_from_env(cfg, env)
    _remotes_from_env(cfg, env)
    for dotted, value in (overrides or {}).items():
        if value is None or value == []:
            continue
        if "." in dotted:
            section, name = dotted.split(".", 1)
            _set(getattr(cfg, section), name, value)
        else:
            setattr(cfg, dotted, value)
    _check_remotes(cfg)
    _check_keys(cfg, env)
    _check_spend(cfg)
    _check_mlx_models(cfg.mlx)
    _drop_loops(cfg)
    _upstream_defaults(cfg)
    if cfg.server.responses_max_count < 1 or cfg.server.responses_max_bytes < 1:
        raise ValueError("server.responses_max_count and server.responses_max_bytes must be at least 1")
    if cfg.server.front_channel not in FRONT_CHANNELS:
        raise ValueError(f"server.front_channel must be one of {', '.join(FRONT_CHANNELS)}, "
                         f"got {cfg.server.front_channel!r}")
    if cfg.server.workers < 1:
        raise ValueError(f"server.workers must be at least 1, got {cfg.server.workers}")
    if cfg.server.workers > 1 and cfg.server.grpc_target:
        raise ValueError("server.workers above 1 needs the inference service in this process: "
                         "it cannot be combined with grpc_target")
    if cfg.server.http_idle_timeout <= 0 or cfg.server.http_body_timeout <= 0:
        raise ValueError("server.http_idle_timeout and server.http_body_timeout must be above 0 seconds")
    _check_tls(cfg)
    return cfg


def _check_tls(cfg: Config) -> None:
    """TLS settings that go together, and PEM files that can be read (a
    one-line error at start rather than a failed handshake later)."""
    from mlxgate.grpc_tls import read_pem

    s = cfg.server
    if bool(s.grpc_tls_cert) != bool(s.grpc_tls_key):
        raise ValueError("server.grpc_tls_cert and server.grpc_tls_key go together (MLXGATE_GRPC_TLS_CERT, "
                         "MLXGATE_GRPC_TLS_KEY): set both or neither")
    if s.grpc_tls_cert and s.front_channel == "grpc" and not s.grpc_target and s.workers == 1:
        raise ValueError("server.front_channel = grpc does not go with grpc_tls_cert (the front would call its "
                         "own TLS port by a loopback address): use front_channel = in-process, the default")
    for path, what in ((s.grpc_tls_cert, "server.grpc_tls_cert"), (s.grpc_tls_key, "server.grpc_tls_key"),
                       (s.grpc_tls_ca, "server.grpc_tls_ca"),
                       *((r.tls_ca, f"remote {r.name!r}: tls_ca") for r in cfg.remotes)):
        if path:
            read_pem(path, what)
