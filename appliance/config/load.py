"""From a composed (untyped) config to the typed, validated `AppConfig`.

Hydra composes the YAML tree without the schema; `load()` merges it over the dataclasses and
validates it, so that every mistake is one `ConfigError` line (the command line exits 2 on it).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import ConfigError, one_line
from .schema import AppConfig, SecurityConfig
from .validate import validate


def conf_dir() -> Path:
    """The config tree: conf/ at the top of a checkout, or appliance/conf in an installed wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("the appliance's conf/ folder is missing")


def shipped_profiles() -> list[str]:
    """The profiles in conf/profile/, by name."""
    return sorted(p.stem for p in (conf_dir() / "profile").glob("*.yaml"))


def _plain(cfg: DictConfig) -> DictConfig:
    """Drop Hydra's own node so only the appliance's keys are validated."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return OmegaConf.create(container)


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
    plain: Optional[DictConfig] = None
    try:
        plain = _plain(raw)
        container = OmegaConf.to_container(plain)
        assert isinstance(container, dict)
        _check_shape(AppConfig, container)
        _apply_presets(container)
        plain = OmegaConf.create(container)
        schema = OmegaConf.structured(AppConfig)
        if "models" in container and "catalog" in (container["models"] or {}):
            schema.models.catalog = {}  # a catalog replaces the built-in one, never adds to it
        typed = OmegaConf.to_object(OmegaConf.merge(schema, plain))
    except OmegaConfBaseException as exc:
        raise one_line(exc, plain) from None
    assert isinstance(typed, AppConfig)
    _apply_env_keys(typed.security)
    validate(typed)
    return typed


def _apply_presets(container: dict[Any, Any]) -> None:
    """Catalog entries that name a preset start from its settings (in place, before the merge
    over the schema: an entry's own keys win, the rest come from the preset)."""
    from .models import check_preset, with_preset

    models = container.get("models") or {}
    presets = models.get("presets") or {}
    for name, preset in presets.items():
        check_preset(preset, f"models.presets.{name}")
    for name, entry in (models.get("catalog") or {}).items():
        if isinstance(entry, dict) and entry.get("preset") is not None:
            models["catalog"][name] = with_preset(entry, presets, f"models.catalog.{name}")


def _apply_env_keys(sec: SecurityConfig) -> None:
    # Keys from the environment are added to any given in config (comma-separated lists).
    for env_name, target in (
        (sec.admin_keys_env, sec.admin_keys),
        (sec.api_keys_env, sec.api_keys),
    ):
        for k in os.environ.get(env_name, "").split(","):
            if k.strip() and k.strip() not in target:
                target.append(k.strip())


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
