"""The base YAML and the key reference, rendered from the schema's one declaration of each key.

    python -m appliance.config.reference --write   # conf/config.yaml and docs/configuration.md
    python -m appliance.config.reference --check   # exit 1 when either is stale

`conf/config.yaml` keeps every key (Hydra's plain `key=value` overrides need the key to be there)
with its help as a comment, so it reads as a full example; it holds no default of its own: it is
rendered from the schema, and a test fails when the committed file differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from .load import conf_dir, shipped_profiles
from .schema import AppConfig
from .validate import RULES, allowed_text, is_optional

NAME = "<name>"  # stands for an entry's name in a map's key paths (a catalog model)
WIDTH = 100

YAML_HEAD = """\
# The base config and the default, rendered from the schema (appliance/config/schema.py) by
# `python -m appliance.config.reference --write`: edit the schema, not this file.
# Profiles in profile/ override it (+profile=NAME); any key can be overridden as key=value.
defaults:
  - _self_
  - override hydra/job_logging: none
  - override hydra/hydra_logging: none
"""
YAML_TAIL = """
hydra:
  output_subdir: null
  run:
    dir: .
  job:
    chdir: false
"""


@dataclass(frozen=True)
class Key:
    """One documented key."""

    path: str
    type: str
    default: Any
    allowed: str
    help: str
    section: bool = False


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _plain(v: Any) -> Any:
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))


def _rule_texts(path: str) -> list[str]:
    return [r.allowed for r in RULES if path in r.keys]


def keys(cls: type = AppConfig, prefix: str = "") -> Iterator[Key]:
    """Every key of the schema, depth first, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, tp = prefix + f.name, hints[f.name]
        check = f.metadata.get("check")
        allowed = [allowed_text(check, is_optional(tp))] if check is not None else []
        allowed += _rule_texts(path)
        inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        default = _default(f)
        if dataclasses.is_dataclass(tp):
            yield Key(path, "section", None, "", f.metadata.get("help", ""), section=True)
            yield from keys(tp, path + ".")  # type: ignore[arg-type]
            continue
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            default = dataclasses.asdict(default)
        elif isinstance(default, dict):
            default = {k: _plain(v) for k, v in default.items()}
        yield Key(path, _type_name(tp), default, "; ".join(allowed), f.metadata.get("help", ""))
        if inner:
            sub = f"{path}.{NAME}." if typing.get_origin(tp) is dict else path + "."
            yield from keys(inner[0], sub)  # type: ignore[arg-type]


# -- conf/config.yaml


def _scalar(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[: -len("\n...")].strip() if text.endswith("...") else text


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text, WIDTH - len(indent) - 2, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "
    )


def _sparse(entry: Any) -> dict[str, Any]:
    """A map entry as the fields that differ from its dataclass's defaults."""
    fresh = type(entry)()
    return {
        f.name: getattr(entry, f.name)
        for f in dataclasses.fields(entry)
        if f.name == "path" or getattr(entry, f.name) != getattr(fresh, f.name)
    }


def _yaml_section(obj: Any, indent: str) -> list[str]:
    out: list[str] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        help_ = f.metadata.get("help", "")
        check = f.metadata.get("check")
        note = help_
        if check is not None:
            note += f" Allowed: {allowed_text(check, is_optional(tp))}."
        if indent == "":
            out.append("")
        out += _comment(note, indent)
        if dataclasses.is_dataclass(value):
            out.append(f"{indent}{f.name}:")
            out += _yaml_section(value, indent + "  ")
        elif isinstance(value, dict) and value:
            out.append(f"{indent}{f.name}:")
            for name, entry in value.items():
                out.append(f"{indent}  {name}:")
                fields = _sparse(entry) if dataclasses.is_dataclass(entry) else entry
                out += [f"{indent}    {k}: {_scalar(v)}" for k, v in fields.items()]
        else:
            out.append(f"{indent}{f.name}: {_scalar(value if value != {} else {})}")
    return out


def render_base_yaml() -> str:
    return YAML_HEAD + "\n".join(_yaml_section(AppConfig(), "")) + "\n" + YAML_TAIL


# -- docs/configuration.md

DOC_INTRO = """\
# Configuration

<!-- Rendered from appliance/config/schema.py by
     `python -m appliance.config.reference --write`. Do not edit by hand: a test fails when
     this file and the schema disagree. -->

One YAML profile declares everything. The base config, `conf/config.yaml`, holds every key at
its default (it is rendered from the same schema as this page); a profile in `conf/profile/`
overrides what differs. Choose one with `+profile=NAME`; single keys can still be overridden
after it:

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


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


def _fmt(value: Any, path: str = "") -> str:
    if isinstance(value, dict) and path == "models.catalog":
        return "`{" + ", ".join(value) + "}`"
    if isinstance(value, dict):
        return "`" + (OmegaConf.to_yaml(value).strip().replace("\n", " ") if value else "{}") + "`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
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


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _leaves(node: dict[Any, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of a profile file; a catalog stays one value."""
    for k, v in node.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and path != "models.catalog":
            yield from _leaves(v, path + ".")
        else:
            yield path, v


def _profiles() -> list[str]:
    lines = ["## Shipped profiles", ""]
    for name in shipped_profiles():
        path = conf_dir() / "profile" / f"{name}.yaml"
        text = path.read_text(encoding="utf-8").splitlines()
        about = [ln.lstrip("# ").rstrip() for ln in text[1:] if ln.startswith("#")]
        lines += [f"### {name}", "", " ".join(about[:3]).strip() or "(no description)", ""]
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        assert isinstance(data, dict)
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| `{k}` | {_cell(_fmt(v, k))} |" for k, v in _leaves(data, "")]
        lines.append("")
    return lines


def render_reference() -> str:
    lines = [
        DOC_INTRO,
        *_profiles(),
        "## Every key",
        "",
        "Defaults are the schema's, which `conf/config.yaml` holds too; keys inside a map entry",
        "(a catalog model) take the default shown when left out.",
        "",
    ]
    section: Optional[str] = None
    for k in keys():
        top = k.path.split(".")[0]
        if top != section:
            section = top
            help_ = next((x.help for x in keys() if x.path == top), "")
            lines += [
                "",
                f"### {top}",
                "",
                help_,
                "",
                "| key | type | default | allowed | meaning |",
                "|---|---|---|---|---|",
            ]
        if k.section:
            continue
        lines.append(
            f"| `{k.path}` | {k.type} | {_cell(_fmt(k.default, k.path))} | "
            f"{_cell(k.allowed) or '-'} | {_cell(k.help)} |"
        )
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"


def outputs(root: Path) -> dict[Path, str]:
    """Each rendered file by its path under a checkout's root."""
    return {
        root / "conf" / "config.yaml": render_base_yaml(),
        root / "docs" / "configuration.md": render_reference(),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.config.reference", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--write", action="store_true", help="write the rendered files")
    parser.add_argument("--check", action="store_true", help="exit 1 when a file is stale")
    parser.add_argument(
        "--root",
        type=Path,
        default=conf_dir().parent,
        help="the checkout's root (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    stale = [
        p
        for p, text in outputs(args.root).items()
        if not p.is_file() or p.read_text(encoding="utf-8") != text
    ]
    if args.write:
        for path, text in outputs(args.root).items():
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        return 0
    for path in stale:
        print(f"stale: {path} (run python -m appliance.config.reference --write)")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
