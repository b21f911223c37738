"""The single validator: each key's declared check, then the rules that span keys.

Raises `ConfigError` on the first problem, naming the key (`middleware[1]`,
`models.catalog.NAME.max_tokens`), the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .checks import Check, ConfigError, Each
from .schema import AppConfig


def is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)


def allowed_text(check: Check, optional: bool) -> str:
    return f"null or {check.allowed}" if optional else check.allowed


def _fields(obj: Any, prefix: str) -> Iterator[tuple[str, Any, Any, dataclasses.Field[Any]]]:
    """(key, value, type, field) of every field below a section, depth first."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = prefix + f.name
        yield path, value, hints[f.name], f
        if dataclasses.is_dataclass(value):
            yield from _fields(value, path + ".")
        elif isinstance(value, dict):
            for name, entry in value.items():
                if dataclasses.is_dataclass(entry):
                    yield from _fields(entry, f"{path}.{name}.")


def check_keys(cfg: Any, prefix: str = "") -> None:
    """Each key's own check (declared with the key in schema.py)."""
    for path, value, tp, f in _fields(cfg, prefix):
        check: Optional[Check] = f.metadata.get("check")
        if check is None or (value is None and is_optional(tp)):
            continue
        if isinstance(check, Each):
            bad = check.bad_item(value)
            if bad is not None and check.item is not None:
                raise ConfigError(f"{path}[{bad}]", value[bad], check.item.allowed)
        if not check.ok(value):
            raise ConfigError(path, value, allowed_text(check, is_optional(tp)))


@dataclass(frozen=True)
class Rule:
    """A rule across keys: `keys` it is about (for the reference), what it allows, and `find`,
    which returns the (key, value) that breaks it, or None."""

    keys: tuple[str, ...]
    allowed: str
    find: Callable[[AppConfig], Optional[tuple[str, Any]]]
    # The message's text when it names more than `allowed` can (a config's own value).
    says: Optional[Callable[[AppConfig], str]] = None


def _tls_pair(c: AppConfig) -> Optional[tuple[str, Any]]:
    tls = c.server.tls
    if (tls.certfile is None) != (tls.keyfile is None):
        return "server.tls", {"certfile": tls.certfile, "keyfile": tls.keyfile}
    return None


def _tls_files(c: AppConfig) -> Optional[tuple[str, Any]]:
    for name in ("certfile", "keyfile"):
        path = getattr(c.server.tls, name)
        if path is not None and not Path(path).expanduser().is_file():
            return f"server.tls.{name}", path
    return None


def _catalog_name(
    key: str, names: Callable[[AppConfig], list[str]]
) -> Callable[[AppConfig], Optional[tuple[str, Any]]]:
    def find(c: AppConfig) -> Optional[tuple[str, Any]]:
        for i, name in enumerate(names(c)):
            if name not in c.models.catalog:
                return (f"{key}[{i}]" if key.endswith("auto_load") else key), name
        return None

    return find


def _alias_targets(c: AppConfig) -> Optional[tuple[str, Any]]:
    for name, target in c.models.aliases.items():
        if target not in c.models.catalog:
            return f"models.aliases.{name}", target
    return None


def _public_keys(c: AppConfig) -> Optional[tuple[str, Any]]:
    if c.security.exposure == "public" and not c.security.api_keys:
        return "security.api_keys", []
    return None


def _public_tls(c: AppConfig) -> Optional[tuple[str, Any]]:
    sec = c.security
    if sec.exposure == "public" and not c.server.tls.certfile and not sec.behind_tls_proxy:
        return "server.tls.certfile", c.server.tls.certfile
    return None


RULES: tuple[Rule, ...] = (
    Rule(
        ("server.tls.certfile", "server.tls.keyfile"),
        "both certfile and keyfile, or neither",
        _tls_pair,
    ),
    Rule(("server.tls.certfile", "server.tls.keyfile"), "an existing file", _tls_files),
    Rule(
        ("models.default",),
        "a catalog name",
        _catalog_name("models.default", lambda c: [c.models.default]),
    ),
    Rule(
        ("models.auto_load",),
        "catalog names",
        _catalog_name("models.auto_load", lambda c: list(c.models.auto_load)),
    ),
    Rule(("models.aliases",), "catalog names", _alias_targets),
    Rule(
        ("security.api_keys",),
        "at least one key when exposure is public",
        _public_keys,
        lambda c: f"at least one key when exposure is public (set {c.security.api_keys_env})",
    ),
    Rule(
        ("server.tls.certfile",),
        "a certificate and key when exposure is public, or security.behind_tls_proxy=true",
        _public_tls,
    ),
)


def validate(c: AppConfig) -> None:
    """Every key's check, then every rule; raises ConfigError on the first problem."""
    check_keys(c)
    for rule in RULES:
        found = rule.find(c)
        if found is not None:
            allowed = rule.says(c) if rule.says is not None else rule.allowed
            if "catalog name" in allowed:
                allowed = f"{allowed}: {sorted(c.models.catalog)}"
            raise ConfigError(found[0], found[1], allowed)
