"""Field validators the request parsers share: each raises InvalidRequest naming the field.

The parsers are pure functions of a decoded body; `param` is the field's path as the client
wrote it (`messages[2].content`, `tools[0].function.parameters`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

import orjson

from ..errors import InvalidRequest

MAX_STOPS = 4
MAX_STOP_LEN = 256


def decode_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object", param=None)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON (UTF-8): {exc}", param=None) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", param=None)
    return body


def no_unknown(body: dict[str, Any], known: Iterable[str], *, where: str = "") -> None:
    """400 naming the first field this endpoint does not know (OpenAI's own wording)."""
    allowed = set(known)
    for k in body:
        if k not in allowed:
            name = f"{where}.{k}" if where else k
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)


def unsupported(body: dict[str, Any], name: str, why: str, *, ok: Iterable[Any] = (None,)) -> None:
    """400 when `name` is set to anything but the values in `ok` (null: absent)."""
    v = body.get(name)
    if v not in list(ok):
        raise InvalidRequest(f"{name} is not supported: {why}", param=name)


def boolean(body: dict[str, Any], key: str, default: bool = False, *, param: str = "") -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequest(f"{param or key} must be a boolean", param=param or key)
    return v


def number(
    body: dict[str, Any],
    key: str,
    lo: float,
    hi: float,
    default: Optional[float] = None,
    *,
    integer: bool = False,
    lo_open: bool = False,
    param: str = "",
) -> Optional[float]:
    v = body.get(key)
    name = param or key
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or (integer and not isinstance(v, int))
    ):
        raise InvalidRequest(f"{name} must be {kind}", param=name)
    if isinstance(v, float) and not math.isfinite(v):
        raise InvalidRequest(f"{name} must be finite", param=name)
    if v < lo or v > hi or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise InvalidRequest(f"{name} must be in {left}{lo:g}, {hi:g}], got {v}", param=name)
    return v


def string(
    body: dict[str, Any], key: str, *, max_len: int = 256, param: str = "", required: bool = False
) -> Optional[str]:
    v = body.get(key)
    name = param or key
    if v is None:
        if required:
            raise InvalidRequest(f"{name} is required", param=name)
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise InvalidRequest(f"{name} must be a string of at most {max_len} characters", param=name)
    return v


def mapping(body: dict[str, Any], key: str, *, param: str = "") -> Optional[dict[str, Any]]:
    v = body.get(key)
    name = param or key
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InvalidRequest(f"{name} must be an object", param=name)
    return v


def metadata(body: dict[str, Any], key: str = "metadata") -> Optional[dict[str, str]]:
    """OpenAI's metadata: at most 16 string pairs (keys up to 64, values up to 512 characters)."""
    v = mapping(body, key)
    if v is None:
        return None
    if len(v) > 16 or not all(
        isinstance(k, str) and len(k) <= 64 and isinstance(x, str) and len(x) <= 512
        for k, x in v.items()
    ):
        raise InvalidRequest(
            f"{key} must map at most 16 keys (up to 64 characters) to strings (up to 512)",
            param=key,
        )
    return v


def stops(body: dict[str, Any], key: str = "stop") -> tuple[str, ...]:
    v = body.get(key)
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if (
        not isinstance(v, list)
        or len(v) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LEN for s in v)
    ):
        raise InvalidRequest(
            f"{key} must be a non-empty string or a list of at most {MAX_STOPS} such strings",
            param=key,
        )
    return tuple(v)


def logit_bias(body: dict[str, Any], vocab_size: int) -> Optional[tuple[tuple[int, float], ...]]:
    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict) or len(v) > 1024:
        raise InvalidRequest("logit_bias must map token ids to numbers", param="logit_bias")
    out = []
    for k, b in v.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"logit_bias key {k!r} is not a token id", param="logit_bias"
            ) from None
        if not 0 <= tok < vocab_size:
            raise InvalidRequest(
                f"logit_bias token {tok} is outside the vocabulary", param="logit_bias"
            )
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise InvalidRequest(
                "logit_bias values must be numbers in [-100, 100]", param="logit_bias"
            )
        out.append((tok, float(b)))
    return tuple(out)


def check_vocab(bias: Optional[tuple[tuple[int, float], ...]], prompt: Any, vocab: int) -> None:
    """Token ids in logit_bias and a token prompt must exist in the model's vocabulary."""
    for tok, _ in bias or ():
        if tok >= vocab:
            raise InvalidRequest(
                f"logit_bias token {tok} is outside the vocabulary", param="logit_bias"
            )
    if isinstance(prompt, tuple) and any(t >= vocab for t in prompt):
        raise InvalidRequest("prompt token ids must be in the vocabulary", param="prompt")
