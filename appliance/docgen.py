"""docs/profiles.md, generated from the schemas so it cannot drift from them.

Keys and types come from the dataclasses in `config.py`, defaults from the composed base config
(or the schema where the base config has no value), and the allowed values from `validate()`
itself: it is run once with a recorder in place of its `_check`, which collects each rule's key
and its "allowed" text. Rules that raise without `_check` are listed in `EXTRA_RULES`.
`python -m appliance.recipes profiles-doc --out docs/profiles.md` writes the file.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator
from typing import Any
from unittest import mock

from omegaconf import OmegaConf

from . import config as config_mod
from .config import AppConfig

NAME = "<name>"  # stands for a catalog entry's name in key paths
RUN_TIME_ONLY = {"safe_mode_reason"}

# Rules that validate() enforces without `_check` (the recorder cannot see them).
EXTRA_RULES = {
    "rate_limits.inference": 'null (off) or limits such as "60/minute" or "60/minute;1000/hour"',
    "rate_limits.admin": 'null (off) or limits such as "10/minute"',
}

DESCRIPTIONS = {
    "server.host": "Address to listen on; 0.0.0.0 serves the LAN, 127.0.0.1 this machine only.",
    "server.port": "TCP port.",
    "server.drain_timeout_s": "On SIGTERM, how long in-flight requests may run before they are ended.",
    "server.allowed_hosts": "Extra Host names accepted while bound to loopback (DNS-rebinding guard).",
    "server.tls.certfile": "PEM certificate: serve HTTPS.",
    "server.tls.keyfile": "PEM private key of the certificate.",
    "models.default": "The model of a request that names none.",
    "models.auto_load": "Models loaded at start (and pinned against idle eviction).",
    "models.prompt_cache_bytes": "Bytes of KV cache kept for prompt-prefix reuse, per model.",
    "models.cuda_unfused_attention_elements": (
        "CUDA: prefill attention up to this many scores skips cuDNN's per-shape graphs (0: never)."
    ),
    "models.cuda_decode_kernel": (
        "CUDA: decode attention over padded batch rows in one kernel, not MLX's four-op fallback."
    ),
    "models.prompt_cache_min_tokens": (
        "Shortest cached prefix reused; a shorter one is prefilled again (null: 32 on CUDA, else 0)."
    ),
    "models.demo_dir": "Where the embedded demo model is built (null: the user cache folder).",
    "models.catalog": "The models this appliance may serve, by name.",
    f"models.catalog.{NAME}.path": "A local model folder, a hub id in the local cache, or builtin:demo.",
    f"models.catalog.{NAME}.context_length": "Prompt plus generated tokens, at most.",
    f"models.catalog.{NAME}.max_tokens": "Most tokens generated for one request.",
    f"models.catalog.{NAME}.ttl_s": "Unload after this many idle seconds.",
    f"models.catalog.{NAME}.prefill_step_size": "Prompt tokens processed per prefill step.",
    f"models.catalog.{NAME}.completion_batch_size": "Most sequences generating together.",
    f"models.catalog.{NAME}.prefill_batch_size": "Most prompts prefilled together (null: completion_batch_size).",
    f"models.catalog.{NAME}.join_window_s": (
        "Longest a new request waits to be prefilled with those arriving beside it (0: next step); "
        "while the HTTP front still holds requests on their way, up to 0.1 s if that is longer."
    ),
    f"models.catalog.{NAME}.fast_joins": (
        "Join and leave the running batch without mlx-lm's copies and extra forward pass, and decode a lone "
        "request without the batch's mask (false: mlx-lm's own path)."
    ),
    f"models.catalog.{NAME}.fuse_projections": (
        "Fuse the q/k/v and the gate/up projections into one matmul each after loading: fewer kernels a "
        "decode step (a model split across ranks is not fused)."
    ),
    f"models.catalog.{NAME}.engine_process": (
        "Run the model in a process of its own: an MLX crash there ends only it; the model reloads."
    ),
    f"models.catalog.{NAME}.max_kv_size": "Rotating KV cache size (null: the whole context).",
    f"models.catalog.{NAME}.trust_remote_code": "Let the tokenizer run code shipped with the model.",
    f"models.catalog.{NAME}.demo_shape": "Shape of the builtin demo model.",
    "limits.max_running": "Requests generating at once (batch slots).",
    "limits.max_queued": "Requests waiting for a slot; beyond it, 429 server_busy.",
    "limits.queue_timeout_s": "Longest wait for a slot before 429 server_busy.",
    "limits.max_body_bytes": "Largest request body; larger gets 413.",
    "limits.request_timeout_s": "Longest a request may run.",
    "limits.mlx_memory_limit_bytes": "mx.set_memory_limit (null: MLX's default).",
    "limits.engine_restarts": "Deaths of one model's generation thread before the process exits 3.",
    "limits.engine_restart_backoff_s": "First wait before reloading a dead model (doubling).",
    "security.admin_keys": "Admin keys (prefer the environment: admin_keys_env).",
    "security.api_keys": "Inference keys; /v1 is open when there are none.",
    "security.admin_keys_env": "Environment variable holding admin keys (comma-separated).",
    "security.api_keys_env": "Environment variable holding inference keys (comma-separated).",
    "security.cors_origins": "Browser origins allowed by CORS.",
    "security.exposure": "public refuses to start without keys and TLS (or a TLS proxy).",
    "security.behind_tls_proxy": "TLS ends at a proxy in front (for exposure: public).",
    "security.open_probes": "/healthz and /readyz answer without a key.",
    "security.open_metrics": "The metrics path answers without a key.",
    "rate_limits.inference": "Per-key limit on POSTs to the /v1 generation routes.",
    "rate_limits.admin": "Per-key limit on POSTs to /admin.",
    "rate_limits.storage": "Storage of the `limits` library (memory:// or redis://...).",
    "shedding.memory_percent": "Inference gets 503 while system memory use is at or above this.",
    "shedding.mlx_active_bytes": "Inference gets 503 while MLX active memory is at or above this.",
    "shedding.retry_after_s": "Retry-After of a shed request.",
    "middleware": "The middleware stack, in the order requests meet it.",
    "metrics.namespace": "Prefix of every metric name.",
    "metrics.path": "Where Prometheus scrapes.",
    "maintenance.cache_trim.max_cache_bytes": "Clear the MLX buffer cache when it grows past this.",
    "maintenance.idle_eviction.pin_auto_load": "Never evict models listed in models.auto_load.",
    "maintenance.memory_watchdog.warn_margin_percent": "Warn (health: degraded) this close to shedding.",
    "state.path": "The runtime state file (null: the platform's state folder).",
    "state.stable_after_s": "A run this long ends safe mode.",
    "state.crash_loop.starts": "Unclean starts within window_s that switch safe mode on.",
    "state.crash_loop.window_s": "The crash-loop window.",
    "logging.level": "Log level.",
    "logging.file": "Log file (null: the platform's log folder; none: stderr only).",
    "logging.format": "Line format.",
    "logging.rotation.max_bytes": "Rotate the log file at this size.",
    "logging.rotation.backups": "Rotated files kept.",
    "helpers.embedding": "A helper node for /v1/embeddings (null: a local model).",
    "helpers.rerank": "A helper node for /v1/rerank (null: a local model).",
    "distributed.backend": "MLX distributed backend.",
    "distributed.hosts": "Hosts of a model split across machines.",
    "distributed.hostfile": "An mlx.launch hostfile instead of hosts.",
    "service.caffeinate": "launchd: hold caffeinate -i while the server runs (no idle sleep).",
    "service.label": "launchd Label and systemd unit name (null: from the profile).",
    "service.working_directory": "The service's working directory (null: the user's home).",
    "service.throttle_interval_s": "Seconds between restarts (launchd ThrottleInterval, RestartSec).",
}
for _task in config_mod.TASK_NAMES:
    DESCRIPTIONS[f"maintenance.{_task}.enabled"] = "Run this task."
    DESCRIPTIONS[f"maintenance.{_task}.interval_s"] = "Seconds between runs."
for _role in ("embedding", "rerank"):
    for _k, _v in {
        "url": "Base URL of the helper (another appliance or the same API).",
        "timeout_s": "Timeout of one call.",
        "retries": "Retries with backoff before failing.",
        "failure_threshold": "Failures in a row that open the circuit breaker.",
        "reset_after_s": "Seconds before an open circuit lets one call through.",
        "model": "Model name sent to the helper (null: the request's).",
        "api_key": "Bearer key sent to the helper; `${oc.env:VAR}` keeps it out of files.",
    }.items():
        DESCRIPTIONS[f"helpers.{_role}.{_k}"] = _v

INTRO = """\
# Profiles

<!-- Generated from appliance/config.py by
     `python -m appliance.recipes profiles-doc --out docs/profiles.md`. Do not edit by hand:
     tests/test_docs.py fails when this file and the schemas disagree. -->

A profile is a YAML file in `conf/profile/` that overrides the base config (`conf/config.yaml`).
Choose one with `+profile=NAME`; single keys can still be overridden after it:

    python -m appliance +profile=mono512 limits.max_running=16 server.port=1234
    python -m appliance +profile=mono512 --cfg job     # print the composed config, run nothing

## How to write a profile

1. Copy the closest shipped profile to `conf/profile/NAME.yaml` (in an installed appliance,
   `appliance/conf/profile/`). Keep the first line `# @package _global_`: it makes the file's
   keys top-level keys, as in the base config.
2. Set only what differs from the base config: every key below has a default.
3. Check it without starting anything: `python -m appliance +profile=NAME --cfg job` prints
   the composed config; a wrong key or value exits 2 with one line naming the key, the value
   and what is allowed (before any model is loaded).
4. Render its service file: `python -m appliance.recipes launchd +profile=NAME` (or `systemd`);
   see docs/operations.md.

Rules that hold across keys: `models.default` and every `models.auto_load` entry must be
catalog names; `server.tls.certfile` and `keyfile` go together; middleware names come from a
fixed table (a config file can't import code). Keys are best left out of profiles: they come
from the environment (`LMX_ADMIN_KEY`, `LMX_API_KEYS`). Safe mode (`safe-mode`) is also merged
over the running config automatically after a crash loop.
"""


@dataclasses.dataclass(frozen=True)
class Key:
    """One documented key."""

    path: str
    type: str
    default: Any
    allowed: str
    description: str


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if origin in (list, typing.List):  # noqa: UP006
        return f"list of {_type_name(args[0])}"
    if origin in (dict, typing.Dict):  # noqa: UP006
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "object"
    if tp is typing.Any:
        return "any"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, tp.__name__)


def _schema_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _walk(cls: type, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(path, type, schema default) for every field, depth first, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not prefix and f.name in RUN_TIME_ONLY:
            continue
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = _schema_default(f)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _walk(tp, path + ".")
            continue
        yield path, tp, default
        inner = [a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if typing.get_origin(tp) is typing.Union and inner:
            yield from _walk(inner[0], path + ".")
        elif typing.get_origin(tp) in (dict, typing.Dict) and inner:  # noqa: UP006
            yield from _walk(inner[0], f"{path}.{NAME}.")


def _normalise(key: str, catalog: set[str]) -> str:
    key = re.sub(r"\[\d+\]$", "", key)
    parts = key.split(".")
    if len(parts) > 2 and parts[:2] == ["models", "catalog"] and parts[2] in catalog:
        parts[2] = NAME
    return ".".join(parts)


def recorded_rules() -> dict[str, list[str]]:
    """key -> allowed texts, from running validate() on a probe config with every optional
    section filled in, a recorder standing in for `_check`."""
    from .__main__ import compose

    cfg = config_mod.load(compose([]))
    # Fill every optional part, so that the rules that only look at it run too.
    cfg.helpers.embedding = config_mod.HelperNode(url="http://helper.invalid:8080")
    cfg.helpers.rerank = config_mod.HelperNode(url="http://helper.invalid:8080")
    cfg.security.cors_origins = ["https://app.invalid"]
    cfg.security.exposure = "public"
    rules: dict[str, list[str]] = {}
    catalog = set(cfg.models.catalog)

    def record(ok: bool, key: str, value: Any, allowed: str) -> None:
        texts = rules.setdefault(_normalise(key, catalog), [])
        if allowed not in texts:
            texts.append(allowed)

    with mock.patch.object(config_mod, "_check", record):
        config_mod.validate(cfg)
    for key, text in EXTRA_RULES.items():
        rules.setdefault(key, []).append(text)
    return rules


def _base_values() -> dict[str, Any]:
    from .__main__ import compose

    data = OmegaConf.to_container(compose([]), resolve=True)
    assert isinstance(data, dict)
    flat: dict[str, Any] = {}

    def go(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and prefix not in ("models.catalog.",):
            for k, v in node.items():
                flat[prefix + str(k)] = v
                go(v, f"{prefix}{k}.")

    go(data, "")
    return flat


def keys() -> list[Key]:
    """Every key of the schema with type, default, allowed values and meaning."""
    rules = recorded_rules()
    base = _base_values()
    out = []
    for path, tp, schema_default in _walk(AppConfig, ""):
        default = base.get(path, schema_default)
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            default = dataclasses.asdict(default)
        allowed = list(rules.get(path, []))
        # A rule on a whole section (server.tls: both or neither) applies to its keys.
        for key, texts in rules.items():
            if path.startswith(key + ".") and key not in {k for k, *_ in _walk(AppConfig, "")}:
                allowed += [t for t in texts if t not in allowed]
        out.append(Key(path, _type_name(tp), default, _allowed(allowed),
                       DESCRIPTIONS.get(path, "")))
    return out


def _fmt(value: Any, path: str = "") -> str:
    if isinstance(value, dict) and path == "models.catalog":
        return "`{" + ", ".join(value) + "}`"
    if isinstance(value, (dict, list)):
        text = OmegaConf.to_yaml(value).strip() if value else ("{}" if isinstance(value, dict) else "[]")
        if isinstance(value, list) and value:
            text = "[" + ", ".join(str(v) for v in value) + "]"
        return "`" + text.replace("\n", " ") + "`"
    if value is None:
        return "`null`"
    if value == "":
        return '`""`'
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    text = f"`{value}`"
    if path.endswith("_bytes") and isinstance(value, int) and value >= 1024:
        text += f" ({_human(value)})"
    return text


def _human(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        size = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}[unit]
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _allowed(texts: list[str]) -> str:
    # "a catalog name: ['demo']" names the base catalog's entries: the rule is what matters.
    return "; ".join(re.sub(r": \[.*\]$", "", t) for t in texts)


def _profile_section() -> list[str]:
    from .recipes import shipped_profiles

    lines = ["## Shipped profiles", ""]
    for name in shipped_profiles():
        path = config_mod.conf_dir() / "profile" / f"{name}.yaml"
        text = path.read_text(encoding="utf-8").splitlines()
        about = [ln.lstrip("# ").rstrip() for ln in text[1:] if ln.startswith("#")]
        lines += [f"### {name}", "", " ".join(about[:3]).strip() or "(no description)", ""]
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        assert isinstance(data, dict)
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| `{k}` | {_cell(_fmt(v, k))} |" for k, v in _leaves(data, "")]
        lines.append("")
    return lines


def _leaves(node: dict[Any, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of a profile file; a catalog stays one value."""
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key != "models.catalog":
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def render_profiles_doc() -> str:
    lines = [INTRO, *_profile_section(), "## Every key", "",
             "Defaults are the base config's (`conf/config.yaml`); keys inside a catalog entry or",
             "a helper node take the schema's default when left out.", ""]
    section = None
    keys_ = keys()
    for k in keys_:
        top = k.path.split(".")[0]
        if top != section:
            section = top
            lines += [f"### {top}", "", "| key | type | default | allowed | meaning |",
                      "|---|---|---|---|---|"]
        lines.append(
            f"| `{k.path}` | {k.type} | {_cell(_fmt(k.default, k.path))} | "
            f"{_cell(k.allowed) or '-'} | {_cell(k.description)} |"
        )
        if k is keys_[-1] or keys_[keys_.index(k) + 1].path.split(".")[0] != top:
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
