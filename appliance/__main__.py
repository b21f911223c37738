"""`python -m appliance [+profile=NAME] [key=value ...] [--cfg job]`: compose, then run.

Plain overrides are composed here and handed to `main`; Hydra's own flags (`--cfg job`,
`--help`, ...) go through Hydra, after the same composition has been checked.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from .config import ConfigError, compose, conf_dir, load, overrides_of, register_schemas
from .main import fail, main


def cli(argv: Optional[list[str]] = None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    overrides = overrides_of(args)
    if overrides is not None:
        try:
            composed = compose(overrides)
            if not any(a.startswith("-") for a in args):
                main(composed)
            if "--cfg" not in args and "-c" not in args:
                load(composed)
        except ConfigError as exc:
            fail(exc)
    import hydra

    register_schemas()
    sys.argv = [sys.argv[0], *args]
    return hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(main)()


if __name__ == "__main__":
    cli()
