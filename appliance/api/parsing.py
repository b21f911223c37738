"""Request parsing: one pure function per endpoint, returning a frozen dataclass or raising
InvalidRequest naming the bad field in `param`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import orjson

from ..engine.types import SamplingParams
from ..errors import InvalidRequest

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4
MAX_STOP_LEN = 256


@dataclass(frozen=True)
class Common:
    model: Optional[str]
    stream: bool
    include_usage: bool
    max_tokens: Optional[int]
    params: SamplingParams
    high_priority: bool
    user: Optional[str]


@dataclass(frozen=True)
class ChatRequest:
    common: Common
    messages: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class CompletionRequest:
    common: Common
    prompt: Union[str, tuple[int, ...]]
    echo: bool


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


def _bool(body: dict[str, Any], key: str, default: bool = False, *, param: str = "") -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequest(f"{param or key} must be a boolean", param=param or key)
    return v


def _number(
    body: dict[str, Any],
    key: str,
    lo: float,
    hi: float,
    default: Optional[float] = None,
    *,
    integer: bool = False,
    lo_open: bool = False,
) -> Optional[float]:
    v = body.get(key)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or (integer and not isinstance(v, int))
    ):
        raise InvalidRequest(f"{key} must be {kind}", param=key)
    if isinstance(v, float) and not math.isfinite(v):
        raise InvalidRequest(f"{key} must be finite", param=key)
    if v < lo or v > hi or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise InvalidRequest(f"{key} must be in {left}{lo:g}, {hi:g}], got {v}", param=key)
    return v


def _string(body: dict[str, Any], key: str, *, max_len: int = 256) -> Optional[str]:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise InvalidRequest(f"{key} must be a string of at most {max_len} characters", param=key)
    return v


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
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
            f"stop must be a non-empty string or a list of at most {MAX_STOPS} such strings",
            param="stop",
        )
    return tuple(v)


def _logit_bias(body: dict[str, Any], vocab_size: int) -> Optional[tuple[tuple[int, float], ...]]:
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


def _common(body: dict[str, Any], vocab_size: int, *, chat: bool) -> Common:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
        raise InvalidRequest("model must be a non-empty string", param="model")
    n = _number(body, "n", 1, 128, 1, integer=True)
    if n != 1:
        raise InvalidRequest("n > 1 is not supported; send several requests", param="n")
    if _number(body, "best_of", 1, 1, integer=True) not in (None, 1):
        raise InvalidRequest("best_of is not supported", param="best_of")
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidRequest("stream_options must be an object", param="stream_options")
        include_usage = _bool(so, "include_usage", param="stream_options.include_usage")
    max_tokens = _number(body, "max_tokens", 1, 1 << 20, integer=True)
    mct = _number(body, "max_completion_tokens", 1, 1 << 20, integer=True)
    if mct is not None:
        max_tokens = mct
    # Greedy unless asked otherwise, as mlx_lm.server does (OpenAI's default is 1.0).
    temperature = _number(body, "temperature", 0, 2, 0.0)
    top_p = _number(body, "top_p", 0, 1, 1.0, lo_open=True)
    top_k = _number(body, "top_k", -1, 1 << 20, 0, integer=True)
    min_p = _number(body, "min_p", 0, 1, 0.0)
    seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
    # Below 0.01 the penalty divides logits into infinities: refuse it instead.
    rep = _number(body, "repetition_penalty", 0.01, 10)
    pres = _number(body, "presence_penalty", -2, 2)
    freq = _number(body, "frequency_penalty", -2, 2)
    if chat:
        logprobs = _bool(body, "logprobs")
        top = _number(body, "top_logprobs", 0, 20, 0, integer=True)
        if top and not logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        lp = _number(body, "logprobs", 0, 20, integer=True)
        logprobs = lp is not None
        top = lp or 0
    priority = body.get("priority")
    if priority not in (None, "normal", "high"):
        raise InvalidRequest("priority must be 'normal' or 'high'", param="priority")
    params = SamplingParams(
        max_tokens=int(max_tokens or 1),
        temperature=float(temperature or 0.0),
        top_p=float(top_p if top_p is not None else 1.0),
        top_k=max(0, int(top_k or 0)),
        min_p=float(min_p or 0.0),
        seed=None if seed is None else int(seed) & ((1 << 64) - 1),
        repetition_penalty=None if rep is None or rep == 1 else float(rep),
        presence_penalty=None if not pres else float(pres),
        frequency_penalty=None if not freq else float(freq),
        logit_bias=_logit_bias(body, vocab_size),
        logprobs=bool(logprobs),
        top_logprobs=int(top or 0),
        stop=_stops(body),
    )
    return Common(
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=None if max_tokens is None else int(max_tokens),
        params=params,
        high_priority=priority == "high",
        user=_string(body, "user"),
    )


def _content(msg: dict[str, Any], i: int) -> str:
    c = msg.get("content")
    param = f"messages[{i}].content"
    if c is None:
        if msg.get("role") == "assistant":
            return ""
        raise InvalidRequest(f"{param} is required", param=param)
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidRequest(
                    f"{param}[{j}] must be a text part {{'type': 'text', 'text': ...}}; "
                    "images and audio are not supported",
                    param=f"{param}[{j}]",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest(f"{param} must be a string or a list of text parts", param=param)


def parse_chat(body: dict[str, Any], vocab_size: int = 1 << 31) -> ChatRequest:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    if len(msgs) > 4096:
        raise InvalidRequest("messages has too many entries (at most 4096)", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role"
            )
        if role == "developer":
            role = "system"
        out.append({"role": role, "content": _content(m, i)})
    return ChatRequest(common=_common(body, vocab_size, chat=True), messages=tuple(out))


def parse_completion(body: dict[str, Any], vocab_size: int = 1 << 31) -> CompletionRequest:
    p = body.get("prompt")
    prompt: Union[str, tuple[int, ...]]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        prompt = p
    elif (
        isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    ):
        if not all(0 <= t < vocab_size for t in p):
            raise InvalidRequest("prompt token ids must be in the vocabulary", param="prompt")
        prompt = tuple(p)
    else:
        raise InvalidRequest(
            "prompt must be a non-empty string or list of token ids (one prompt per request)",
            param="prompt",
        )
    if body.get("suffix") is not None:
        raise InvalidRequest("suffix is not supported", param="suffix")
    return CompletionRequest(
        common=_common(body, vocab_size, chat=False),
        prompt=prompt,
        echo=_bool(body, "echo"),
    )


def check_vocab(
    params: SamplingParams, prompt: Union[str, tuple[int, ...], None], vocab: int
) -> None:
    """Token ids in logit_bias and a token prompt must exist in the model's vocabulary."""
    for tok, _ in params.logit_bias or ():
        if tok >= vocab:
            raise InvalidRequest(
                f"logit_bias token {tok} is outside the vocabulary", param="logit_bias"
            )
    if isinstance(prompt, tuple) and any(t >= vocab for t in prompt):
        raise InvalidRequest("prompt token ids must be in the vocabulary", param="prompt")
