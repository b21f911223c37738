"""Configuration: the schema (each key declared once), composition, loading and validation.

    composed YAML (Hydra) -> load() -> AppConfig (typed, validated) -> builder

Imports nothing else of the appliance: every part may import it.
"""

from .checks import ConfigError
from .compose import compose, overrides_of
from .load import conf_dir, load, redacted, safe_mode_overlay, shipped_profiles
from .schema import (
    MIDDLEWARE_NAMES,
    TASK_NAMES,
    AppConfig,
    CacheTrimTask,
    CrashLoopConfig,
    DistributedConfig,
    EngineConfig,
    HelperNode,
    HelpersConfig,
    IdleEvictionTask,
    LimitsConfig,
    LoggingConfig,
    MaintenanceConfig,
    MemoryWatchdogTask,
    MetricsConfig,
    ModelsConfig,
    ModelSpec,
    RateLimitsConfig,
    ResponsesConfig,
    RotationConfig,
    SecurityConfig,
    ServerConfig,
    ServiceConfig,
    SheddingConfig,
    StateConfig,
    TLSConfig,
)
from .validate import validate


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
        ("engine", EngineConfig),
        ("responses", ResponsesConfig),
    ):
        cs.store(group="schema", name=name, node=node)


__all__ = [
    "MIDDLEWARE_NAMES",
    "TASK_NAMES",
    "AppConfig",
    "CacheTrimTask",
    "ConfigError",
    "CrashLoopConfig",
    "DistributedConfig",
    "EngineConfig",
    "HelperNode",
    "HelpersConfig",
    "IdleEvictionTask",
    "LimitsConfig",
    "LoggingConfig",
    "MaintenanceConfig",
    "MemoryWatchdogTask",
    "MetricsConfig",
    "ModelSpec",
    "ModelsConfig",
    "RateLimitsConfig",
    "ResponsesConfig",
    "RotationConfig",
    "SecurityConfig",
    "ServerConfig",
    "ServiceConfig",
    "SheddingConfig",
    "StateConfig",
    "TLSConfig",
    "compose",
    "conf_dir",
    "load",
    "overrides_of",
    "redacted",
    "register_schemas",
    "safe_mode_overlay",
    "shipped_profiles",
    "validate",
]
