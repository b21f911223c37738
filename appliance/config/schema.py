"""The typed configuration: every key declared once, with its type, default, help and check.

`key(default, help, check=...)` is the one declaration of a key. From it come the defaults
(`load` merges the composed YAML over these dataclasses), the validation (`validate.py` runs each
field's check), the base YAML `conf/config.yaml` and the reference `docs/configuration.md`
(both rendered by `reference.py`; a test proves the committed files are what it renders).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .checks import Between, Check, Each, Holds, Matches, OneOf

MIDDLEWARE_NAMES = (
    "request_id",
    "access_log",
    "host_guard",
    "body_limit",
    "cors",
    "load_shedding",
    "auth",
    "rate_limit",
)
TASK_NAMES = ("cache_trim", "idle_eviction", "memory_watchdog", "state_snapshot", "helper_probe")


def key(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Optional[Callable[[], Any]] = None,
    check: Optional[Check] = None,
) -> Any:
    """A config key: its default (or a factory for lists, maps and sections), help and check."""
    meta = {"help": help, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _url(v: Any) -> bool:
    return isinstance(v, str) and v.startswith(("http://", "https://"))


def _rate_limit(v: Any) -> bool:
    from limits import parse_many

    parse_many(v)
    return True


def _cidr(v: Any) -> bool:
    import ipaddress

    ipaddress.ip_network(v, strict=False)
    return isinstance(v, str)


def _origin(v: Any) -> bool:
    return v == "*" or _url(v)


@dataclass
class TLSConfig:
    certfile: Optional[str] = key(None, "PEM certificate: serve HTTPS.")
    keyfile: Optional[str] = key(None, "PEM private key of the certificate.")


@dataclass
class ServerConfig:
    host: str = key(
        "127.0.0.1", "Address to listen on; 0.0.0.0 serves the LAN, 127.0.0.1 this machine only."
    )
    port: int = key(8080, "TCP port.", check=Between(1, 65535, unit="(port number)"))
    drain_timeout_s: float = key(
        30.0,
        "On SIGTERM, how long in-flight requests may run before they are ended.",
        check=Between(0, unit="seconds"),
    )
    allowed_hosts: List[str] = key(
        help="Extra Host names accepted while bound to loopback (DNS-rebinding guard).",
        factory=list,
    )
    tls: TLSConfig = key(help="HTTPS: both files, or neither.", factory=TLSConfig)


@dataclass
class ModelSpec:
    """One catalog entry: where the model is and how it is served."""

    path: str = key(
        "builtin:demo",
        "A local model folder (MLX or Hugging Face layout), a .gguf file, a hub id in the local "
        "cache, builtin:smollm2 (a real instruct model) or builtin:demo (tiny, meaningless).",
        check=Holds(bool, "a model folder, .gguf file, hub id, builtin:smollm2 or builtin:demo"),
    )
    context_length: int = key(
        4096, "Prompt plus generated tokens, at most.", check=Between(16, unit="tokens")
    )
    max_tokens: int = key(
        2048, "Most tokens generated for one request.", check=Between(1, unit="tokens")
    )
    ttl_s: float = key(
        0.0,
        "Unload after this many idle seconds (0: never).",
        check=Between(0, unit="seconds (0 = never evicted)"),
    )
    prefill_step_size: Optional[int] = key(
        None,
        "Prompt tokens processed per prefill step (null: 2048 on a GPU, where longer chunks "
        "run faster, 512 on the CPU).",
        check=Between(1, unit="tokens"),
    )
    prefill_budget_tokens: Optional[int] = key(
        0,
        "While other sequences decode, most prompt tokens prefilled between two of their "
        "steps, across the prompts being prefilled (0: as many as take about 3/4 of a decode "
        "step, learnt as it runs, so their inter-token gaps stay within about 2x; null: "
        "prefill_step_size per prompt, as mlx-lm does). Needs fast_joins.",
        check=Between(0, unit="tokens"),
    )
    completion_batch_size: int = key(
        32, "Most sequences generating together.", check=Between(1, unit="sequences")
    )
    prefill_batch_size: Optional[int] = key(
        None,
        "Most prompts prefilled together (null: completion_batch_size).",
        check=Between(1, unit="prompts"),
    )
    join_window_s: float = key(
        0.02,
        "Longest a new request waits to be prefilled with those arriving beside it (0: next "
        "step); while the HTTP front still holds requests on their way, up to 0.1 s if that is "
        "longer.",
        check=Between(0, 1, unit="seconds"),
    )
    fast_joins: bool = key(
        True,
        "Join and leave the running batch without mlx-lm's copies and "
        "extra forward pass, and decode a lone request without the batch's "
        "mask (false: mlx-lm's own path).",
    )
    fuse_projections: bool = key(
        True,
        "Fuse the q/k/v and the gate/up projections into one "
        "matmul each after loading: fewer kernels a decode step (a model "
        "split across ranks is not fused).",
    )
    engine_process: bool = key(
        False,
        "Run the model in a process of its own: an MLX crash there "
        "ends only it; the model reloads.",
    )
    max_kv_size: Optional[int] = key(
        None, "Rotating KV cache size (null: the whole context).", check=Between(1, unit="tokens")
    )
    trust_remote_code: bool = key(False, "Let the tokenizer run code shipped with the model.")
    chat_template: Optional[str] = key(
        None,
        "A Jinja chat template to use instead of the model's own: a file path, or the "
        "template itself (null: the model's).",
    )
    preset: Optional[str] = key(
        None, "A name in models.presets whose settings this entry starts from (its own keys win)."
    )
    tool_parser: Optional[str] = key(
        None,
        "The model's tool-call format (hermes, qwen3_coder, llama3, mistral, glm, harmony, "
        "an mlx-lm parser name, or none); null: detected from the chat template and tokens.",
    )
    kv_bits: Optional[int] = key(
        None,
        "Keep this model's cached prompt prefixes quantized to 4 or 8 bits (in memory and on "
        "disk; about 1/4 or 1/2 the bytes of 16-bit ones), dequantized when a prompt reuses "
        "one (null: as the model computes them).",
        check=OneOf((4, 8)),
    )
    demo_shape: str = key(
        "demo", "Shape of the builtin demo model.", check=OneOf(("demo", "llama-1b"))
    )
    cpu_weights: str = key(
        "auto",
        "On the CPU backend, quantized layers as stored or dequantized to dense float32 "
        "(auto: dense when an optimized BLAS is in use and the dense weights take at most a "
        "quarter of memory). GPUs keep the weights as stored.",
        check=OneOf(("auto", "dense", "quantized")),
    )


def _default_catalog() -> dict[str, ModelSpec]:
    return {
        # SmolLM2-135M-Instruct (Apache-2.0): answers real questions; fetched by `make run`.
        "smollm2": ModelSpec(path="builtin:smollm2", context_length=8192, max_tokens=2048),
        # Tiny and meaningless, built on first use: for tests and benchmarks.
        "demo": ModelSpec(path="builtin:demo", context_length=2048, max_tokens=512),
    }


@dataclass
class ModelsConfig:
    default: str = key("smollm2", "The model of a request that names none (a catalog name).")
    auto_load: List[str] = key(
        help="Models loaded at start (and pinned against idle eviction).",
        factory=lambda: ["smollm2"],
    )
    prompt_cache_bytes: Optional[int] = key(
        None,
        "Bytes of KV cache kept for prompt-prefix reuse, per model (null: a quarter of the "
        "memory MLX may use: the device's on CUDA, else the system's; the memory governor "
        "evicts it before refusing a request).",
        check=Between(0, unit="bytes"),
    )
    prompt_cache_min_tokens: Optional[int] = key(
        None,
        "Shortest cached prefix reused; a shorter one is prefilled again (null: 32 on "
        "CUDA, where a kernel launch per cache array outweighs a short prefill; else 0).",
        check=Between(0, unit="tokens"),
    )
    prompt_cache_dir: Optional[str] = key(
        None,
        "Folder of the prompt cache's disk tier: cached prefixes evicted from memory, or held "
        "when the model is idle, unloaded or the appliance stops, are written there (one "
        "subfolder per model) and read back when a prompt starts with one (null: off).",
        check=Holds(bool, "a folder path"),
    )
    prompt_cache_disk_bytes: int = key(
        8 * 1024**3,
        "Bytes of prompt cache files kept in prompt_cache_dir, per model (least recently "
        "used removed first).",
        check=Between(0, unit="bytes"),
    )
    prompt_cache_preload_s: float = key(
        2.0,
        "At load, read prompt_cache_dir's files back into memory, most recently used first, "
        "within prompt_cache_bytes, starting no read after this many seconds; the model is "
        "ready after, and the first turns after a restart find their prefixes in memory (0: "
        "a file is read when a prompt first needs it).",
        check=Between(0, unit="seconds"),
    )
    cuda_unfused_attention_elements: int = key(
        1 << 31,
        "CUDA: prefill attention up to this many scores (batch x heads x query x key "
        "length) runs as matmul + softmax, in pieces of bounded memory, instead of cuDNN, "
        "which builds a graph per new shape, so once per chunk after a cached prefix "
        "(0: always cuDNN).",
        check=Between(0, unit="scores"),
    )
    cuda_decode_kernel: bool = key(
        True,
        "CUDA: decode attention over padded batch rows in one kernel, not MLX's four-op fallback.",
    )
    builtin_dir: Optional[str] = key(
        None,
        "Where the built-in models live (the demo model is built there, SmolLM2 fetched "
        "there) and GGUF files are converted to (null: the user cache folder's models/).",
    )
    allow_downloads: bool = key(
        False,
        "Let a load by hub id fetch the model when it is not in the local Hugging Face "
        "cache (false: only what is already there; nothing is downloaded at request time).",
    )
    presets: Dict[str, Dict[str, Any]] = key(
        help="Named sets of model settings (any catalog-entry key but path and preset), applied "
        "by `preset: NAME` in a catalog entry or an admin load, e.g. agent-32k: "
        "{context_length: 32768, max_tokens: 4096}.",
        factory=dict,
    )
    catalog: Dict[str, ModelSpec] = key(
        help="The models this appliance may serve, by name.",
        factory=_default_catalog,
        check=Holds(bool, "at least one model"),
    )
    aliases: Dict[str, str] = key(
        help="Other names clients may ask for (agents send their own, e.g. claude-sonnet-4-5, "
        "gpt-5-codex), exact or glob patterns (claude-*), each mapped to a catalog name; an exact "
        "name wins over a pattern, patterns are tried in the order written. Listed in /v1/models.",
        factory=dict,
    )


@dataclass
class LimitsConfig:
    max_running: int = key(
        8, "Requests generating at once (batch slots).", check=Between(1, unit="requests")
    )
    max_queued: int = key(
        32,
        "Requests waiting for a slot; beyond it, 429 server_busy.",
        check=Between(0, unit="requests"),
    )
    queue_timeout_s: float = key(
        10.0,
        "Longest wait for a slot before 429 server_busy (with Retry-After).",
        check=Between(0, 300, lo_open=True, unit="seconds"),
    )
    max_body_bytes: int = key(
        1024 * 1024, "Largest request body; larger gets 413.", check=Between(1024, unit="bytes")
    )
    request_timeout_s: float = key(
        300.0, "Longest a request may run.", check=Between(0, lo_open=True, unit="seconds")
    )
    mlx_memory_limit_bytes: Optional[int] = key(
        None,
        "mx.set_memory_limit (null: MLX's default).",
        check=Between(0, lo_open=True, unit="bytes"),
    )
    engine_restarts: int = key(
        3,
        "Deaths of one model's generation thread before the process "
        "exits 3 (so launchd / systemd restarts it).",
        check=Between(0, unit="restarts"),
    )
    engine_restart_backoff_s: float = key(
        1.0,
        "First wait before reloading a dead model (doubling).",
        check=Between(0, lo_open=True, unit="seconds"),
    )


@dataclass
class SecurityConfig:
    admin_keys: List[str] = key(
        help="Admin keys (prefer the environment: admin_keys_env).", factory=list
    )
    api_keys: List[str] = key(help="Inference keys; /v1 is open when there are none.", factory=list)
    admin_keys_env: str = key(
        "LMX_ADMIN_KEY", "Environment variable holding admin keys (comma-separated)."
    )
    api_keys_env: str = key(
        "LMX_API_KEYS", "Environment variable holding inference keys (comma-separated)."
    )
    cors_origins: List[str] = key(
        help="Browser origins allowed by CORS.",
        factory=list,
        check=Each(Holds(_origin, "origins like https://host[:port]")),
    )
    exposure: str = key(
        "lan",
        "public refuses to start without keys and TLS (or a TLS proxy).",
        check=OneOf(("lan", "public")),
    )
    behind_tls_proxy: bool = key(False, "TLS ends at a proxy in front (for exposure: public).")
    open_probes: bool = key(True, "/healthz and /readyz answer without a key.")
    open_metrics: bool = key(
        True, "The metrics path answers without a key (unless metrics_allow lists addresses)."
    )
    metrics_allow: List[str] = key(
        help="Client networks (CIDRs such as 10.0.0.5/32) that may scrape the metrics path "
        "without a key; any other client needs a key. Empty: open_metrics decides.",
        factory=list,
        check=Each(Holds(_cidr, "IPv4 or IPv6 networks such as 10.0.0.0/24 or ::1/128")),
    )


@dataclass
class RateLimitsConfig:
    inference: Optional[str] = key(
        None,
        "Per-key limit on POSTs to the /v1 generation routes.",
        check=Holds(_rate_limit, 'a limit such as "60/minute" or "60/minute;1000/hour"'),
    )
    admin: Optional[str] = key(
        None,
        "Per-key limit on POSTs to /admin and GETs of /status and /status.json.",
        check=Holds(_rate_limit, 'a limit such as "10/minute"'),
    )
    storage: str = key("memory://", "Storage of the `limits` library (memory:// or redis://...).")


@dataclass
class SheddingConfig:
    memory_percent: float = key(
        95.0,
        "Inference gets 503 while system memory use is at or above this.",
        check=Between(0, 100, lo_open=True, unit="percent"),
    )
    mlx_active_bytes: Optional[int] = key(
        None,
        "Inference gets 503 while MLX active memory is at or above this.",
        check=Between(0, lo_open=True, unit="bytes"),
    )
    retry_after_s: int = key(5, "Retry-After of a shed request.", check=Between(1, unit="seconds"))


@dataclass
class MetricsConfig:
    namespace: str = key(
        "lmx",
        "Prefix of every metric name.",
        check=Matches(r"[A-Za-z0-9_]+", "letters, digits and _"),
    )
    path: str = key(
        "/metrics", "Where Prometheus scrapes.", check=Matches(r"/.*", "a path starting with /")
    )


_ENABLED = "Run this task."
_INTERVAL = "Seconds between runs."
_POSITIVE_S = Between(0, lo_open=True, unit="seconds")


@dataclass
class CacheTrimTask:
    enabled: bool = key(True, _ENABLED)
    interval_s: float = key(30.0, _INTERVAL, check=_POSITIVE_S)
    max_cache_bytes: int = key(
        1024 * 1024 * 1024,
        "Clear the MLX buffer cache when it grows past this.",
        check=Between(0, unit="bytes"),
    )


@dataclass
class IdleEvictionTask:
    enabled: bool = key(True, _ENABLED)
    interval_s: float = key(30.0, _INTERVAL, check=_POSITIVE_S)
    pin_auto_load: bool = key(True, "Never evict models listed in models.auto_load.")


@dataclass
class MemoryWatchdogTask:
    enabled: bool = key(True, _ENABLED)
    interval_s: float = key(10.0, _INTERVAL, check=_POSITIVE_S)
    warn_margin_percent: float = key(
        5.0,
        "Warn (health: degraded) this close to shedding.",
        check=Between(0, 100, unit="percent"),
    )


@dataclass
class StateSnapshotTask:
    enabled: bool = key(True, _ENABLED)
    interval_s: float = key(60.0, _INTERVAL, check=_POSITIVE_S)


@dataclass
class HelperProbeTask:
    enabled: bool = key(True, _ENABLED)
    interval_s: float = key(15.0, _INTERVAL, check=_POSITIVE_S)


@dataclass
class MaintenanceConfig:
    cache_trim: CacheTrimTask = key(
        help="Clear MLX's buffer cache past a size.", factory=CacheTrimTask
    )
    idle_eviction: IdleEvictionTask = key(
        help="Unload models idle past their ttl_s.", factory=IdleEvictionTask
    )
    memory_watchdog: MemoryWatchdogTask = key(
        help="Warn before memory shedding starts.", factory=MemoryWatchdogTask
    )
    state_snapshot: StateSnapshotTask = key(help="Write the state file.", factory=StateSnapshotTask)
    helper_probe: HelperProbeTask = key(help="Probe the helper nodes.", factory=HelperProbeTask)


@dataclass
class CrashLoopConfig:
    starts: int = key(
        3,
        "Starts in a row, each after a run that ended uncleanly before it ran stable_after_s, "
        "that switch safe mode on.",
        check=Between(2, unit="starts"),
    )
    window_s: float = key(
        3600.0,
        "How far back such starts count; long enough to hold several slow model loads.",
        check=_POSITIVE_S,
    )


@dataclass
class StateConfig:
    path: Optional[str] = key(None, "The runtime state file (null: the platform's state folder).")
    stable_after_s: float = key(
        300.0,
        "Seconds of clean running that end safe mode (by itself) and, outside safe mode, clear "
        "the crash-loop history.",
        check=_POSITIVE_S,
    )
    crash_loop: CrashLoopConfig = key(
        help="When repeated crashes switch safe mode on.", factory=CrashLoopConfig
    )


@dataclass
class RotationConfig:
    max_bytes: int = key(
        10 * 1024 * 1024, "Rotate the log file at this size.", check=Between(0, unit="bytes")
    )
    backups: int = key(5, "Rotated files kept.", check=Between(0, unit="files"))


@dataclass
class LoggingConfig:
    level: str = key(
        "INFO",
        "Log level.",
        check=OneOf(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), upper=True),
    )
    file: Optional[str] = key(
        None, "Log file (null: the platform's log folder; none: stderr only)."
    )
    format: str = key(
        "auto",
        "Line format: json, console (a readable line, coloured on a terminal), or auto (console "
        "on a terminal, JSON to files and pipes). text: the old name of console.",
        check=OneOf(("auto", "json", "console", "text")),
    )
    rotation: RotationConfig = key(
        help="Size-based rotation of the log file.", factory=RotationConfig
    )


@dataclass
class HelperNode:
    url: str = key(
        "",
        "Base URL of the helper (another appliance or the same API).",
        check=Holds(_url, "an http(s) URL"),
    )
    timeout_s: float = key(10.0, "Timeout of one call.", check=_POSITIVE_S)
    retries: int = key(2, "Retries with backoff before failing.", check=Between(0, unit="retries"))
    failure_threshold: int = key(
        3, "Failures in a row that open the circuit breaker.", check=Between(1, unit="failures")
    )
    reset_after_s: float = key(
        10.0, "Seconds before an open circuit lets one call through.", check=_POSITIVE_S
    )
    model: Optional[str] = key(None, "Model name sent to the helper (null: the request's).")
    api_key: Optional[str] = key(
        None, "Bearer key sent to the helper; `${oc.env:VAR}` keeps it out of files."
    )


@dataclass
class HelpersConfig:
    embedding: Optional[HelperNode] = key(
        None, "A helper node for /v1/embeddings (null: a local model)."
    )
    rerank: Optional[HelperNode] = key(None, "A helper node for /v1/rerank (null: a local model).")


@dataclass
class DistributedConfig:
    backend: str = key("ring", "MLX distributed backend.", check=OneOf(("ring", "mpi", "jaccl")))
    hosts: List[str] = key(help="Hosts of a model split across machines.", factory=list)
    hostfile: Optional[str] = key(None, "An mlx.launch hostfile instead of hosts.")


def _blas(v: Any) -> bool:
    return v in ("auto", "bundled") or (isinstance(v, str) and v.startswith("/"))


@dataclass
class EngineConfig:
    cpu_blas: str = key(
        "auto",
        "Linux, MLX on the CPU: the BLAS MLX multiplies with. auto: an installed OpenBLAS "
        "(libopenblas0-pthread) if found, preloaded by starting the process again; bundled: "
        "the mlx wheel's reference BLAS; or the absolute path of a library with CBLAS symbols.",
        check=Holds(_blas, "auto | bundled | an absolute path to a BLAS library"),
    )
    cpu_gemv_forward: bool = key(
        True,
        "With a preloaded BLAS, send one-row matrix products (a decode step) to its gemv "
        "through a small library compiled once with the system C compiler.",
    )


@dataclass
class ServiceConfig:
    """How `python -m appliance.recipes` renders the launchd plist and systemd unit."""

    caffeinate: bool = key(
        False, "launchd: hold caffeinate -i while the server runs (no idle sleep)."
    )
    label: Optional[str] = key(
        None,
        "launchd Label and systemd unit name (null: from the profile).",
        check=Matches(r"[A-Za-z0-9][A-Za-z0-9._-]*", "letters, digits, '.', '_' and '-'"),
    )
    working_directory: Optional[str] = key(
        None, "The service's working directory (null: the user's home)."
    )
    throttle_interval_s: int = key(
        10,
        "Seconds between restarts (launchd ThrottleInterval, systemd RestartSec).",
        check=Between(1, unit="seconds"),
    )


@dataclass
class ResponsesConfig:
    """The OpenAI Responses API's stored responses (`store: true`, `previous_response_id`)."""

    store_max: int = key(
        1000,
        "Responses kept in memory for previous_response_id and GET /v1/responses/{id}; the "
        "oldest is dropped past this (0: none kept).",
        check=Between(0, unit="responses"),
    )
    store_max_bytes: int = key(
        64 * 1024 * 1024,
        "Bytes of stored input and output items, at most; the oldest responses are dropped past "
        "this.",
        check=Between(0, unit="bytes"),
    )


@dataclass
class AppConfig:
    """The whole typed config; each component receives only its own section."""

    server: ServerConfig = key(help="The HTTP listener.", factory=ServerConfig)
    models: ModelsConfig = key(help="The model catalog and what is loaded.", factory=ModelsConfig)
    limits: LimitsConfig = key(help="Admission, sizes and timeouts.", factory=LimitsConfig)
    security: SecurityConfig = key(help="Keys, CORS and exposure.", factory=SecurityConfig)
    rate_limits: RateLimitsConfig = key(
        help="Per-key request rates (null: off).", factory=RateLimitsConfig
    )
    shedding: SheddingConfig = key(
        help="503 for inference under memory pressure.", factory=SheddingConfig
    )
    middleware: List[str] = key(
        help="The middleware stack, in the order requests meet it.",
        factory=lambda: list(MIDDLEWARE_NAMES),
        check=Each(OneOf(MIDDLEWARE_NAMES), unique=True),
    )
    metrics: MetricsConfig = key(help="The Prometheus endpoint.", factory=MetricsConfig)
    maintenance: MaintenanceConfig = key(
        help="Background tasks, each with its interval.", factory=MaintenanceConfig
    )
    state: StateConfig = key(
        help="The runtime state file and the crash-loop rule.", factory=StateConfig
    )
    logging: LoggingConfig = key(help="Log lines and the log file.", factory=LoggingConfig)
    helpers: HelpersConfig = key(
        help="Upstream helper nodes for embeddings and rerank.", factory=HelpersConfig
    )
    distributed: DistributedConfig = key(
        help="A model split across ranks.", factory=DistributedConfig
    )
    engine: EngineConfig = key(help="How MLX computes in this process.", factory=EngineConfig)
    service: ServiceConfig = key(
        help="How the launchd / systemd service files are rendered.", factory=ServiceConfig
    )
    responses: ResponsesConfig = key(
        help="Stored responses of the OpenAI Responses API.", factory=ResponsesConfig
    )
