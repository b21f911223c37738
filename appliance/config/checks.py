"""Declarative checks on config values: each knows the one-line text of what it allows.

A schema field names its check once (`key(..., check=Between(1, 65535))`); `validate` runs it and
the reference docs print its `allowed` text, so the rule and its documentation cannot drift.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class Check:
    """A rule on one value; `allowed` says in a few words what passes."""

    allowed: str = ""

    def ok(self, value: Any) -> bool:
        raise NotImplementedError


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Between(Check):
    """lo <= value <= hi (either end open or absent); `unit` is printed after the range."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    unit: str = ""

    @property
    def allowed(self) -> str:  # type: ignore[override]
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            if not self.lo_open and not self.hi_open:
                text = f"{_num(lo)}..{_num(hi)}"
            else:
                text = (
                    f"{_num(lo)} {'<' if self.lo_open else '<='} value "
                    f"{'<' if self.hi_open else '<='} {_num(hi)}"
                )
        elif lo is not None:
            text = f"{'>' if self.lo_open else '>='} {_num(lo)}"
        elif hi is not None:
            text = f"{'<' if self.hi_open else '<='} {_num(hi)}"
        else:
            text = "a number"
        return f"{text} {self.unit}".strip()

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (
            self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi))
        )


@dataclass(frozen=True)
class OneOf(Check):
    values: tuple[Any, ...]
    upper: bool = False  # compare case-insensitively (log levels)

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return " | ".join(str(v) for v in self.values)

    def ok(self, value: Any) -> bool:
        if self.upper and isinstance(value, str):
            value = value.upper()
        return value in self.values


@dataclass(frozen=True)
class Matches(Check):
    pattern: str
    allowed: str = ""  # type: ignore[misc]

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.pattern, value) is not None


@dataclass(frozen=True)
class Each(Check):
    """Every item of a list passes `item`; `unique`: no item twice."""

    item: Optional[Check] = None
    unique: bool = False

    @property
    def allowed(self) -> str:  # type: ignore[override]
        parts = [f"each {self.item.allowed}" if self.item is not None else ""]
        if self.unique:
            parts.append("each once")
        return "; ".join(p for p in parts if p)

    def ok(self, value: Any) -> bool:
        if not isinstance(value, list):
            return False
        return not self.unique or len(set(map(str, value))) == len(value)

    def bad_item(self, value: Sequence[Any]) -> Optional[int]:
        """The index of the first item that fails, if any."""
        if self.item is None:
            return None
        return next((i for i, v in enumerate(value) if not self.item.ok(v)), None)


@dataclass(frozen=True)
class Holds(Check):
    """Any predicate, with its text."""

    test: Callable[[Any], bool]
    allowed: str = ""  # type: ignore[misc]

    def ok(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except Exception:  # a predicate that can't judge the value refuses it
            return False


class ConfigError(ValueError):
    """A config value is wrong: `key`, the bad `value` and what is `allowed`."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key}={value!r} is invalid; allowed: {allowed}")


# What a schema node of each kind takes, for the one-line message of a wrong type.
_KINDS = {
    "IntegerNode": "an integer",
    "FloatNode": "a number",
    "BooleanNode": "true or false",
    "StringNode": "a string",
    "EnumNode": "one of the enum's names",
}
UNKNOWN_KEY = "a key of the config; `python -m appliance --cfg job` lists them"


def one_line(exc: OmegaConfBaseException, plain: Optional[DictConfig] = None) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    value: Any = getattr(exc, "value", None)
    if value is None and plain is not None and key != "?":
        value = OmegaConf.select(plain, key, default=None)
    if isinstance(exc, ConfigKeyError):
        return ConfigError(key, value, UNKNOWN_KEY)
    kind = _KINDS.get(type(getattr(exc, "child_node", None)).__name__)
    if isinstance(exc, ValidationError) and kind is not None:
        return ConfigError(key, value, kind)
    return ConfigError(key, value, msg)
