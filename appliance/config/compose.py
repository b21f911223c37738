"""Hydra composition: the conf/ tree plus `+profile=NAME` and `key=value` overrides.

Composed without the typed schema, so that `load()` is the single validator and every mistake is
one line (Hydra's own type errors would be several lines and exit 1).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Optional

from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from .checks import ConfigError
from .load import conf_dir
from .schema import AppConfig

# Hydra flags that take the next argument as their value.
_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--info",
    "-i",
    "--experimental-rerun",
}


def overrides_of(argv: list[str]) -> Optional[list[str]]:
    """The key=value overrides of a plain run, or None when Hydra flags need Hydra itself."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _FLAGS_WITH_VALUE:
            skip = True
            continue
        if arg.startswith("-"):
            return None if arg in ("-h", "--help", "--hydra-help") else out + []
        out.append(arg)
    return out


def compose(overrides: list[str]) -> DictConfig:
    """Compose the config tree with Hydra's compose API; ConfigError on a bad override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except MissingConfigException as exc:
        # An unknown profile (or other group option): name the options there are.
        group, _, option = (exc.missing_cfg_file or "profile/?").rpartition("/")
        folder = conf_dir() / (group or "profile")
        options = exc.options or sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(
            group or "profile", option, f"one of the {group or 'profile'}s: {', '.join(options)}"
        ) from None
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise _compose_error(exc, overrides) from None
    finally:
        GlobalHydra.instance().clear()


def _compose_error(exc: Exception, overrides: list[str]) -> ConfigError:
    """One line for a Hydra composition error: the override, its value and what to do."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    named = re.search(r"override '([^']+)'", first)
    key = named.group(1) if named else ""
    if not key:
        for o in overrides:
            name = o.lstrip("+~").split("=")[0]
            if name and (name in first or name.split("/")[0] in first):
                key = name
                break
    key = key or (overrides[0].lstrip("+~").split("=")[0] if overrides else "?")
    value = next(
        (o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=")[0] == key and "=" in o),
        None,
    )
    cause = exc.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and schema_has(key):
        # A key of the schema that the YAML does not set (a catalog entry's batch sizes, say).
        allowed = f"a key the profile does not set: add it with +{key}={value or '...'}"
    elif isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        # Hydra would suggest +key=value, but the schema would refuse that key as well.
        allowed = "a key of the config; `python -m appliance --cfg job` lists them"
    elif key == "profile" and "No match in the defaults list" in first:
        allowed = "+profile=NAME (with the +) to choose a profile"
    else:
        allowed = " ".join(ln for ln in lines[:2] if not ln.startswith("See https://"))
    return ConfigError(key, value, allowed)


def schema_has(key: str) -> bool:
    """Whether a dotted key names a field of the typed schema (dict entries: any name)."""
    node: Any = AppConfig
    parts = key.split(".")
    i = 0
    while i < len(parts):
        if not dataclasses.is_dataclass(node):
            return False
        hints = typing.get_type_hints(node)
        if parts[i] not in hints:
            return False
        node = hints[parts[i]]
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if typing.get_origin(node) is dict:
            node, i = args[-1], i + 1  # skip the entry's name
        elif args and dataclasses.is_dataclass(args[0]):
            node = args[0]  # Optional[Section]
        i += 1
    return True
