"""Model settings from one declaration (`ModelSpec`): a catalog entry, a preset, and the body of
an admin load are all read here, so a setting added to the schema reaches all of them."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import ConfigError, one_line
from .schema import ModelSpec
from .validate import check_keys

SETTINGS = tuple(f.name for f in dataclasses.fields(ModelSpec))
# What a preset may hold: every setting but where the model is and which preset it takes.
PRESET_SETTINGS = tuple(s for s in SETTINGS if s not in ("path", "preset"))


def with_preset(entry: Mapping[str, Any], presets: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An entry's settings over its preset's (the entry's own keys win)."""
    out = dict(entry)
    name = out.get("preset")
    if name is None:
        return out
    if name not in presets:
        raise ConfigError(f"{where}.preset", name, f"a name in models.presets: {sorted(presets)}")
    preset = presets[name] or {}
    check_preset(preset, f"models.presets.{name}")
    return {**preset, **out}


def check_preset(preset: Mapping[str, Any], where: str) -> None:
    if not isinstance(preset, Mapping):
        raise ConfigError(where, preset, "a mapping of model settings")
    for key in preset:
        if key not in PRESET_SETTINGS:
            raise ConfigError(
                f"{where}.{key}", preset[key], f"a model setting: {', '.join(PRESET_SETTINGS)}"
            )
    model_spec({"path": "builtin:demo", **preset}, where)


def model_spec(entry: Mapping[str, Any], where: str) -> ModelSpec:
    """A ModelSpec from plain settings, type- and range-checked like the config; ConfigError
    naming `where.KEY` otherwise."""
    for key in entry:
        if key not in SETTINGS:
            raise ConfigError(
                f"{where}.{key}", entry[key], f"a model setting: {', '.join(SETTINGS)}"
            )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelSpec), dict(entry))
        spec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        err = one_line(exc)
        raise ConfigError(f"{where}.{err.key}", err.value, err.allowed) from None
    assert isinstance(spec, ModelSpec)
    check_keys(spec, f"{where}.")
    return spec


def settings_of(spec: ModelSpec) -> dict[str, Any]:
    """The settings of an entry that differ from the defaults (and its path, always)."""
    fresh = ModelSpec()
    return {
        f: getattr(spec, f)
        for f in SETTINGS
        if f == "path" or getattr(spec, f) != getattr(fresh, f)
    }
