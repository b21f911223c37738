"""`python -m appliance [+profile=NAME] [key=value ...] [--cfg job]`: compose, validate, serve.

A bad profile or override exits with status 2 and one line naming the key, the value and what
is allowed (a supervisor can tell a config error from a crash: RestartPreventExitStatus=2).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from omegaconf import DictConfig

from .config import ConfigError, conf_dir, load, register_schemas

# Hydra flags that take the next argument as their value.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def _overrides(argv: list[str]) -> Optional[list[str]]:
    """The key=value overrides of a plain run, or None when Hydra flags need Hydra itself."""
    out = []
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
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        key = overrides[0].split("=")[0] if overrides else "?"
        for o in overrides:
            name = o.lstrip("+~").split("=")[0]
            if name and (name in first or name.split("/")[0] in first):
                key = name
                break
        raise ConfigError(key, next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith(key + "=")), None), first) from None
    finally:
        GlobalHydra.instance().clear()


def fail(exc: ConfigError) -> None:
    print(str(exc), file=sys.stderr)
    sys.exit(2)


def run(cfg: DictConfig) -> None:
    """The Hydra task: validate, apply safe mode if a crash loop says so, build, serve."""
    from . import logs
    from .builder import build
    from .server import serve

    try:
        typed = load(cfg)
    except ConfigError as exc:
        fail(exc)
    logs.setup(typed.logging)
    appliance = build(typed)
    serve(appliance)


def main(argv: Optional[list[str]] = None) -> Any:
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    register_schemas()
    overrides = _overrides(args)
    if overrides is not None:
        try:
            composed = compose(overrides)
            if "--cfg" not in args and "-c" not in args:
                load(composed)
        except ConfigError as exc:
            fail(exc)
    sys.argv = [sys.argv[0], *args]
    return hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(run)()


if __name__ == "__main__":
    main()
