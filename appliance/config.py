"""Typed configuration: dataclass schemas, the ConfigStore entries and the single validator.

Hydra composes the YAML tree untyped; `load()` merges it over the structured schema and checks
ranges and cross-field rules, raising `ConfigError` with one line naming the key, the bad value
and what is allowed. `__main__` turns that into exit status 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

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


class ConfigError(ValueError):
    """A config value is wrong: `key`, the bad `value` and what is `allowed`."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key}={value!r} is invalid; allowed: {allowed}")


@dataclass
class TLSConfig:
    certfile: Optional[str] = None
    keyfile: Optional[str] = None


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    drain_timeout_s: float = 30.0
    allowed_hosts: List[str] = field(default_factory=list)
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass
class ModelSpec:
    """One catalog entry. `path` is a local folder, a cached hub id or `builtin:demo`."""

    path: str = "builtin:demo"
    context_length: int = 4096
    max_tokens: int = 2048
    ttl_s: float = 0.0  # 0: never evicted for idleness
    prefill_step_size: int = 512
    completion_batch_size: int = 32
    # null: as many as completion_batch_size, so a wave of arrivals is prefilled in one call
    prefill_batch_size: Optional[int] = None
    # Longest a new request waits to be prefilled together with requests arriving beside it
    # (the ones that just finished, coming back); 0 = join at the next step. While the HTTP
    # front still holds requests on their way, up to engine.worker.ARRIVING_WAIT_S (0.1 s) if
    # that is longer; an idle engine also waits engine.worker.SETTLE_S after each arrival.
    join_window_s: float = 0.02
    # Requests join and leave the running batch through appliance.engine.batching (no copy of
    # the prompt batch, no forward pass of their own, one read of the padding per change)
    # instead of mlx-lm's BatchGenerator as is; same tokens. false: mlx-lm's own path.
    fast_joins: bool = True
    # q/k/v and gate/up projections fused into one matmul each after the load (engine/fusion.py):
    # fewer kernel launches a step; the same tokens (on the CPU bit-identical logits). Not for
    # a model split across ranks.
    fuse_projections: bool = True
    # The model in an engine process of its own, beside the server: a hard crash of MLX there
    # (an abort, a segfault, an out-of-memory kill) ends only that process, and the model is
    # reloaded like a dead generation thread. Same speed as the thread on an H100 at 32 and 64
    # clients (BENCHMARKS.md), the same time to /readyz; a second copy of the tokenizer.
    engine_process: bool = False
    max_kv_size: Optional[int] = None
    trust_remote_code: bool = False
    demo_shape: str = "demo"  # only for builtin:demo: demo | llama-1b


@dataclass
class ModelsConfig:
    default: str = "demo"
    auto_load: List[str] = field(default_factory=list)
    prompt_cache_bytes: int = 256 * 1024 * 1024
    # A cached prefix shorter than this is prefilled again: copying and merging its KV cache
    # into the batch can cost more than prefilling a few tokens. null: 32 on CUDA, where a
    # kernel launch per cache array outweighs a short prefill; 0 (reuse any) on Metal and CPU.
    prompt_cache_min_tokens: Optional[int] = None
    # On CUDA, prefill attention whose score matrix has at most this many entries (batch x
    # heads x query x key length) runs as matmul + softmax instead of through cuDNN, which
    # builds a graph (~40 ms) for each new shape, i.e. at nearly every join. 0: always cuDNN.
    cuda_unfused_attention_elements: int = 1 << 27
    # On CUDA, a decode step's attention over a batch whose rows are padded (a boolean mask) runs
    # in the appliance's one-launch kernel (engine/cuda.py) instead of MLX's matmul-where-softmax-
    # matmul fallback, which is what MLX does with an array mask. false: MLX's own.
    cuda_decode_kernel: bool = True
    demo_dir: Optional[str] = None
    catalog: Dict[str, ModelSpec] = field(default_factory=dict)


@dataclass
class LimitsConfig:
    max_running: int = 8
    max_queued: int = 32
    queue_timeout_s: float = 10.0
    max_body_bytes: int = 1024 * 1024
    request_timeout_s: float = 300.0
    mlx_memory_limit_bytes: Optional[int] = None
    # A model whose generation thread dies is reloaded (backoff from engine_restart_backoff_s,
    # doubling); past engine_restarts deaths of one model the process exits 3 for launchd.
    engine_restarts: int = 3
    engine_restart_backoff_s: float = 1.0


@dataclass
class SecurityConfig:
    admin_keys: List[str] = field(default_factory=list)
    api_keys: List[str] = field(default_factory=list)
    admin_keys_env: str = "LMX_ADMIN_KEY"
    api_keys_env: str = "LMX_API_KEYS"
    cors_origins: List[str] = field(default_factory=list)
    exposure: str = "lan"
    behind_tls_proxy: bool = False
    open_probes: bool = True
    open_metrics: bool = True


@dataclass
class RateLimitsConfig:
    inference: Optional[str] = None
    admin: Optional[str] = None
    storage: str = "memory://"


@dataclass
class SheddingConfig:
    memory_percent: float = 95.0
    mlx_active_bytes: Optional[int] = None
    retry_after_s: int = 5


@dataclass
class MetricsConfig:
    namespace: str = "lmx"
    path: str = "/metrics"


@dataclass
class CacheTrimTask:
    enabled: bool = True
    interval_s: float = 30.0
    max_cache_bytes: int = 1024 * 1024 * 1024


@dataclass
class IdleEvictionTask:
    enabled: bool = True
    interval_s: float = 30.0
    pin_auto_load: bool = True


@dataclass
class MemoryWatchdogTask:
    enabled: bool = True
    interval_s: float = 10.0
    warn_margin_percent: float = 5.0


@dataclass
class StateSnapshotTask:
    enabled: bool = True
    interval_s: float = 60.0


@dataclass
class HelperProbeTask:
    enabled: bool = True
    interval_s: float = 15.0


@dataclass
class MaintenanceConfig:
    cache_trim: CacheTrimTask = field(default_factory=CacheTrimTask)
    idle_eviction: IdleEvictionTask = field(default_factory=IdleEvictionTask)
    memory_watchdog: MemoryWatchdogTask = field(default_factory=MemoryWatchdogTask)
    state_snapshot: StateSnapshotTask = field(default_factory=StateSnapshotTask)
    helper_probe: HelperProbeTask = field(default_factory=HelperProbeTask)


@dataclass
class CrashLoopConfig:
    starts: int = 3
    window_s: float = 60.0


@dataclass
class StateConfig:
    path: Optional[str] = None
    stable_after_s: float = 300.0
    crash_loop: CrashLoopConfig = field(default_factory=CrashLoopConfig)


@dataclass
class RotationConfig:
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5


@dataclass
class LoggingConfig:
    level: str = "INFO"
    file: Optional[str] = None  # null: the platform's log folder; "" or "none": no file
    format: str = "json"
    rotation: RotationConfig = field(default_factory=RotationConfig)


@dataclass
class HelperNode:
    url: str = ""
    timeout_s: float = 10.0
    retries: int = 2
    failure_threshold: int = 3
    reset_after_s: float = 10.0
    model: Optional[str] = None
    api_key: Optional[str] = None  # sent as a Bearer token when the helper wants one


@dataclass
class HelpersConfig:
    embedding: Optional[HelperNode] = None
    rerank: Optional[HelperNode] = None


@dataclass
class DistributedConfig:
    backend: str = "ring"
    hosts: List[str] = field(default_factory=list)
    hostfile: Optional[str] = None


@dataclass
class ServiceConfig:
    """How `python -m appliance.recipes` renders the launchd plist and systemd unit."""

    caffeinate: bool = False  # macOS: hold a `caffeinate -i` assertion while the server runs
    label: Optional[str] = None  # null: com.appliance.<profile> (launchd), appliance-<profile> (systemd)
    working_directory: Optional[str] = None  # null: the service user's home
    throttle_interval_s: int = 10  # launchd ThrottleInterval, systemd RestartSec


@dataclass
class AppConfig:
    """The whole typed config; each component receives only its own section."""

    server: ServerConfig = field(default_factory=ServerConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    shedding: SheddingConfig = field(default_factory=SheddingConfig)
    middleware: List[str] = field(default_factory=lambda: list(MIDDLEWARE_NAMES))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    state: StateConfig = field(default_factory=StateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    helpers: HelpersConfig = field(default_factory=HelpersConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    # Set at run time, never from YAML: why the appliance is in safe mode, if it is.
    safe_mode_reason: Optional[str] = None


def register_schemas() -> None:
    """Put every group's schema in Hydra's ConfigStore (for tooling and docs)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="appliance_schema", node=AppConfig)
    for name, node in (
        ("server", ServerConfig),
        ("models", ModelsConfig),
        ("limits", LimitsConfig),
        ("security", SecurityConfig),
        ("rate_limits", RateLimitsConfig),
        ("shedding", SheddingConfig),
        ("metrics", MetricsConfig),
        ("maintenance", MaintenanceConfig),
        ("state", StateConfig),
        ("logging", LoggingConfig),
        ("helpers", HelpersConfig),
        ("distributed", DistributedConfig),
        ("service", ServiceConfig),
    ):
        cs.store(group="schema", name=name, node=node)


def conf_dir() -> Path:
    """The config tree: conf/ at the top of a checkout, or appliance/conf in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("the appliance's conf/ folder is missing")


def _plain(cfg: DictConfig) -> DictConfig:
    """Drop Hydra's own node so only the appliance's keys are validated."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return OmegaConf.create(container)


# What a schema node of each kind takes, for the one-line message of a wrong type.
_KINDS = {
    "IntegerNode": "an integer",
    "FloatNode": "a number",
    "BooleanNode": "true or false",
    "StringNode": "a string",
    "EnumNode": "one of the enum's names",
}
_UNKNOWN_KEY = "a key of the config; `python -m appliance --cfg job` lists them"


def _one_line(exc: OmegaConfBaseException, plain: Optional[DictConfig] = None) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    value: Any = getattr(exc, "value", None)
    if value is None and plain is not None and key != "?":
        value = OmegaConf.select(plain, key, default=None)
    if isinstance(exc, ConfigKeyError):
        return ConfigError(key, value, _UNKNOWN_KEY)
    kind = _KINDS.get(type(getattr(exc, "child_node", None)).__name__)
    if isinstance(exc, ValidationError) and kind is not None:
        return ConfigError(key, value, kind)
    return ConfigError(key, value, msg)


def _check_shape(schema: type, data: dict[Any, Any], prefix: str = "") -> None:
    """A section, list or mapping given a scalar (e.g. `logging=4`) named by its key; OmegaConf's
    own merge error for that names no key."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in data or data[f.name] is None:
            continue
        value, kind, key = data[f.name], hints[f.name], prefix + f.name
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Union and len(args) == 1:
            kind = args[0]
        origin = typing.get_origin(kind)
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(key, value, f"a mapping of keys, e.g. {key}.KEY=VALUE")
            _check_shape(kind, value, key + ".")  # type: ignore[arg-type]
        elif origin is list and not isinstance(value, list):
            raise ConfigError(key, value, "a list such as [a,b]")
        elif origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(key, value, f"a mapping of names, e.g. {key}.NAME.KEY=VALUE")
            item = typing.get_args(kind)[1]
            if dataclasses.is_dataclass(item):
                for name, entry in value.items():
                    if not isinstance(entry, dict):
                        raise ConfigError(f"{key}.{name}", entry, "a mapping of keys")
                    _check_shape(item, entry, f"{key}.{name}.")  # type: ignore[arg-type]


def load(cfg: DictConfig | dict[str, Any]) -> AppConfig:
    """Merge a composed config over the schema, validate it, and return the typed config."""
    raw = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    try:
        plain = _plain(raw)
        plain.pop("safe_mode_reason", None)
        container = OmegaConf.to_container(plain)
        assert isinstance(container, dict)
        _check_shape(AppConfig, container)
        merged = OmegaConf.merge(OmegaConf.structured(AppConfig), plain)
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, locals().get("plain")) from None
    assert isinstance(typed, AppConfig)
    _apply_env_keys(typed.security)
    validate(typed)
    return typed


def _apply_env_keys(sec: SecurityConfig) -> None:
    # Keys from the environment are added to any given in config (comma-separated lists).
    for env_name, target in ((sec.admin_keys_env, sec.admin_keys), (sec.api_keys_env, sec.api_keys)):
        for key in os.environ.get(env_name, "").split(","):
            if key.strip() and key.strip() not in target:
                target.append(key.strip())


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def validate(c: AppConfig) -> None:
    """Ranges and cross-field rules; raises ConfigError on the first problem."""
    _check(1 <= c.server.port <= 65535, "server.port", c.server.port, "1..65535")
    _check(c.server.drain_timeout_s >= 0, "server.drain_timeout_s", c.server.drain_timeout_s, ">= 0")
    tls = c.server.tls
    _check(
        (tls.certfile is None) == (tls.keyfile is None),
        "server.tls",
        {"certfile": tls.certfile, "keyfile": tls.keyfile},
        "both certfile and keyfile, or neither",
    )
    _check(bool(c.models.catalog), "models.catalog", {}, "at least one model")
    _check(
        c.models.default in c.models.catalog,
        "models.default",
        c.models.default,
        f"a catalog name: {sorted(c.models.catalog)}",
    )
    for i, name in enumerate(c.models.auto_load):
        _check(
            name in c.models.catalog,
            f"models.auto_load[{i}]",
            name,
            f"a catalog name: {sorted(c.models.catalog)}",
        )
    _check(c.models.prompt_cache_bytes >= 0, "models.prompt_cache_bytes", c.models.prompt_cache_bytes, ">= 0")
    _check(
        c.models.prompt_cache_min_tokens is None or c.models.prompt_cache_min_tokens >= 0,
        "models.prompt_cache_min_tokens", c.models.prompt_cache_min_tokens, ">= 0 or null",
    )
    _check(
        c.models.cuda_unfused_attention_elements >= 0, "models.cuda_unfused_attention_elements",
        c.models.cuda_unfused_attention_elements, ">= 0",
    )
    for name, spec in c.models.catalog.items():
        k = f"models.catalog.{name}"
        _check(bool(spec.path), f"{k}.path", spec.path, "a model folder, hub id or builtin:demo")
        _check(spec.context_length >= 16, f"{k}.context_length", spec.context_length, ">= 16")
        _check(spec.max_tokens >= 1, f"{k}.max_tokens", spec.max_tokens, ">= 1")
        _check(spec.ttl_s >= 0, f"{k}.ttl_s", spec.ttl_s, ">= 0 (0 = never evicted)")
        _check(spec.prefill_step_size >= 1, f"{k}.prefill_step_size", spec.prefill_step_size, ">= 1")
        _check(spec.completion_batch_size >= 1, f"{k}.completion_batch_size", spec.completion_batch_size, ">= 1")
        _check(
            spec.prefill_batch_size is None or spec.prefill_batch_size >= 1,
            f"{k}.prefill_batch_size", spec.prefill_batch_size, ">= 1 or null",
        )
        _check(0 <= spec.join_window_s <= 1, f"{k}.join_window_s", spec.join_window_s, "0 to 1 (seconds)")
        _check(spec.demo_shape in ("demo", "llama-1b"), f"{k}.demo_shape", spec.demo_shape, "demo | llama-1b")
    lim = c.limits
    _check(lim.max_running >= 1, "limits.max_running", lim.max_running, ">= 1")
    _check(lim.max_queued >= 0, "limits.max_queued", lim.max_queued, ">= 0")
    _check(lim.queue_timeout_s >= 0, "limits.queue_timeout_s", lim.queue_timeout_s, ">= 0")
    _check(lim.max_body_bytes >= 1024, "limits.max_body_bytes", lim.max_body_bytes, ">= 1024")
    _check(lim.request_timeout_s > 0, "limits.request_timeout_s", lim.request_timeout_s, "> 0")
    _check(
        lim.mlx_memory_limit_bytes is None or lim.mlx_memory_limit_bytes > 0,
        "limits.mlx_memory_limit_bytes",
        lim.mlx_memory_limit_bytes,
        "null or > 0",
    )
    sec = c.security
    _check(sec.exposure in ("lan", "public"), "security.exposure", sec.exposure, "lan | public")
    for name in ("certfile", "keyfile"):
        path = getattr(tls, name)
        _check(path is None or Path(path).expanduser().is_file(), f"server.tls.{name}", path, "an existing file")
    if sec.exposure == "public":
        # Public: never an open /v1, never keys in clear unless a proxy in front does TLS.
        _check(bool(sec.api_keys), "security.api_keys", [], f"at least one key when exposure is public (set {sec.api_keys_env})")
        _check(
            bool(tls.certfile) or sec.behind_tls_proxy,
            "server.tls.certfile",
            tls.certfile,
            "a certificate and key when exposure is public, or security.behind_tls_proxy=true",
        )
    for origin in sec.cors_origins:
        _check(
            origin == "*" or origin.startswith(("http://", "https://")),
            "security.cors_origins",
            origin,
            "origins like https://host[:port]",
        )
    from limits import parse_many

    for key in ("inference", "admin"):
        value = getattr(c.rate_limits, key)
        if value is not None:
            try:
                parse_many(value)
            except ValueError:
                raise ConfigError(
                    f"rate_limits.{key}", value, 'null or a limit such as "60/minute"'
                ) from None
    shed = c.shedding
    _check(
        0 < shed.memory_percent <= 100,
        "shedding.memory_percent",
        shed.memory_percent,
        "0 < value <= 100",
    )
    _check(shed.retry_after_s >= 1, "shedding.retry_after_s", shed.retry_after_s, ">= 1")
    for i, name in enumerate(c.middleware):
        _check(name in MIDDLEWARE_NAMES, f"middleware[{i}]", name, f"one of {list(MIDDLEWARE_NAMES)}")
    _check(
        len(set(c.middleware)) == len(c.middleware), "middleware", c.middleware, "each name once"
    )
    _check(c.metrics.path.startswith("/"), "metrics.path", c.metrics.path, "a path starting with /")
    _check(
        c.metrics.namespace.replace("_", "").isalnum(),
        "metrics.namespace",
        c.metrics.namespace,
        "letters, digits and _",
    )
    for name in TASK_NAMES:
        task = getattr(c.maintenance, name)
        _check(task.interval_s > 0, f"maintenance.{name}.interval_s", task.interval_s, "> 0")
    _check(lim.engine_restarts >= 0, "limits.engine_restarts", lim.engine_restarts, ">= 0")
    _check(
        lim.engine_restart_backoff_s > 0,
        "limits.engine_restart_backoff_s",
        lim.engine_restart_backoff_s,
        "> 0",
    )
    m = c.maintenance
    _check(m.cache_trim.max_cache_bytes >= 0, "maintenance.cache_trim.max_cache_bytes",
           m.cache_trim.max_cache_bytes, ">= 0")
    _check(0 <= m.memory_watchdog.warn_margin_percent <= 100,
           "maintenance.memory_watchdog.warn_margin_percent",
           m.memory_watchdog.warn_margin_percent, "0..100")
    _check(c.state.crash_loop.starts >= 2, "state.crash_loop.starts", c.state.crash_loop.starts, ">= 2")
    _check(c.state.crash_loop.window_s > 0, "state.crash_loop.window_s", c.state.crash_loop.window_s, "> 0")
    _check(c.state.stable_after_s > 0, "state.stable_after_s", c.state.stable_after_s, "> 0")
    levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    _check(c.logging.level.upper() in levels, "logging.level", c.logging.level, " | ".join(levels))
    _check(c.logging.format in ("json", "text"), "logging.format", c.logging.format, "json | text")
    for role in ("embedding", "rerank"):
        node = getattr(c.helpers, role)
        if node is not None:
            _check(
                node.url.startswith(("http://", "https://")),
                f"helpers.{role}.url",
                node.url,
                "an http(s) URL",
            )
            _check(node.retries >= 0, f"helpers.{role}.retries", node.retries, ">= 0")
            _check(node.timeout_s > 0, f"helpers.{role}.timeout_s", node.timeout_s, "> 0")
            _check(node.reset_after_s > 0, f"helpers.{role}.reset_after_s", node.reset_after_s, "> 0")
            _check(
                node.failure_threshold >= 1,
                f"helpers.{role}.failure_threshold",
                node.failure_threshold,
                ">= 1",
            )
    _check(
        c.distributed.backend in ("ring", "mpi", "jaccl"),
        "distributed.backend",
        c.distributed.backend,
        "ring | mpi | jaccl",
    )
    svc = c.service
    _check(
        svc.throttle_interval_s >= 1, "service.throttle_interval_s", svc.throttle_interval_s, ">= 1"
    )
    _check(
        svc.label is None or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", svc.label) is not None,
        "service.label",
        svc.label,
        "null or letters, digits, '.', '_' and '-'",
    )


def safe_mode_overlay() -> DictConfig:
    """The safe-mode profile's file, to merge over a composed config at run time."""
    overlay = OmegaConf.load(conf_dir() / "profile" / "safe-mode.yaml")
    assert isinstance(overlay, DictConfig)
    return overlay


def redacted(c: AppConfig) -> dict[str, Any]:
    """The typed config as plain data with every secret replaced."""
    data = OmegaConf.to_container(OmegaConf.structured(c), resolve=True)
    assert isinstance(data, dict)
    sec = data["security"]
    sec["admin_keys"] = ["<redacted>"] * len(sec["admin_keys"])
    sec["api_keys"] = ["<redacted>"] * len(sec["api_keys"])
    for node in (data.get("helpers") or {}).values():
        if isinstance(node, dict) and node.get("api_key"):
            node["api_key"] = "<redacted>"
    return {str(k): v for k, v in data.items()}
