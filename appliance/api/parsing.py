"""OpenAI request parsing: one pure function per endpoint, from a decoded body to the engine's
ChatRequest (plus what only the wire format needs), or InvalidRequest naming the bad field.

Every field of the `openai` SDK's request types is either honoured or refused with a 400 that
names it (docs/api.md has the table); a field the API does not have is refused as OpenAI does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..engine import constraints
from ..engine.chat import ChatRequest, ResponseFormat, Tool, ToolChoice
from ..engine.output.prompt import Message, ToolCall, ToolSpec, parse_arguments
from ..engine.types import SamplingParams
from ..errors import InvalidRequest
from .fields import (
    MAX_STOP_LEN,
    MAX_STOPS,
    boolean,
    logit_bias,
    mapping,
    metadata,
    no_unknown,
    number,
    stops,
    string,
    unsupported,
)

__all__ = [
    "MAX_STOPS",
    "MAX_STOP_LEN",
    "ROLES",
    "OpenAIChat",
    "OpenAICompletion",
    "parse_chat",
    "parse_completion",
]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
TEXT_ONLY = "this model reads text only; send text parts"

# Fields both endpoints take (the sampling knobs, and this server's extensions).
_COMMON = (
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "n",
    "stop",
    "user",
    "priority",
)
CHAT_FIELDS = (
    *_COMMON,
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "metadata",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "reasoning_effort",
    "chat_template_kwargs",
    "store",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "service_tier",
    "modalities",
    "audio",
    "prediction",
    "verbosity",
    "web_search_options",
    "moderation",
)
COMPLETION_FIELDS = (*_COMMON, "prompt", "best_of", "echo", "suffix")


@dataclass(frozen=True)
class OpenAIChat:
    request: ChatRequest
    stream: bool
    include_usage: bool
    # The request used the deprecated `functions`: the answer is a `function_call` (one call).
    legacy_functions: bool = False


@dataclass(frozen=True)
class OpenAICompletion:
    request: ChatRequest
    stream: bool
    include_usage: bool
    echo: bool


@dataclass(frozen=True)
class _Common:
    model: Optional[str]
    stream: bool
    include_usage: bool
    max_tokens: Optional[int]
    params: SamplingParams
    high_priority: bool


def _common(body: dict[str, Any], vocab_size: int, *, chat: bool) -> _Common:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
        raise InvalidRequest("model must be a non-empty string", param="model")
    n = number(body, "n", 1, 128, 1, integer=True)
    if n != 1:
        raise InvalidRequest("n > 1 is not supported; send several requests", param="n")
    stream = boolean(body, "stream")
    so = mapping(body, "stream_options")
    include_usage = False
    if so is not None:
        no_unknown(so, ("include_usage", "include_obfuscation"), where="stream_options")
        include_usage = boolean(so, "include_usage", param="stream_options.include_usage")
        boolean(so, "include_obfuscation", param="stream_options.include_obfuscation")
    max_tokens = number(body, "max_tokens", 1, 1 << 20, integer=True)
    if chat:
        mct = number(body, "max_completion_tokens", 1, 1 << 20, integer=True)
        if mct is not None:
            max_tokens = mct
    # Greedy unless asked otherwise, as mlx_lm.server does (OpenAI's default is 1.0).
    temperature = number(body, "temperature", 0, 2, 0.0)
    top_p = number(body, "top_p", 0, 1, 1.0, lo_open=True)
    top_k = number(body, "top_k", -1, 1 << 20, 0, integer=True)
    min_p = number(body, "min_p", 0, 1, 0.0)
    seed = number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True)
    # Below 0.01 the penalty divides logits into infinities: refuse it instead.
    rep = number(body, "repetition_penalty", 0.01, 10)
    pres = number(body, "presence_penalty", -2, 2)
    freq = number(body, "frequency_penalty", -2, 2)
    if chat:
        logprobs = boolean(body, "logprobs")
        top = number(body, "top_logprobs", 0, 20, 0, integer=True)
        if top and not logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        lp = number(body, "logprobs", 0, 20, integer=True)
        logprobs = lp is not None
        top = lp or 0
    priority = body.get("priority")
    if priority not in (None, "normal", "high"):
        raise InvalidRequest("priority must be 'normal' or 'high'", param="priority")
    string(body, "user")
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
        logit_bias=logit_bias(body, vocab_size),
        logprobs=bool(logprobs),
        top_logprobs=int(top or 0),
        stop=stops(body),
    )
    return _Common(
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=None if max_tokens is None else int(max_tokens),
        params=params,
        high_priority=priority == "high",
    )


# -- messages


def _text(c: Any, param: str, *, allow_none: bool = False) -> str:
    """A message's content: a string or a list of text parts."""
    if c is None:
        if allow_none:
            return ""
        raise InvalidRequest(f"{param} is required", param=param)
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text", "refusal"):
                text = part.get("text", part.get("refusal"))
                if isinstance(text, str):
                    parts.append(text)
                    continue
            if kind in ("image_url", "input_audio", "file", "image", "input_image"):
                raise InvalidRequest(
                    f"{param}[{j}] is a {kind} part: {TEXT_ONLY}", param=f"{param}[{j}]"
                )
            raise InvalidRequest(
                f"{param}[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                param=f"{param}[{j}]",
            )
        return "".join(parts)
    raise InvalidRequest(f"{param} must be a string or a list of text parts", param=param)


def _tool_calls(v: Any, param: str) -> tuple[ToolCall, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise InvalidRequest(f"{param} must be a list", param=param)
    out = []
    for j, tc in enumerate(v):
        p = f"{param}[{j}]"
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(
                f"{p} must be {{'type': 'function', 'function': {{name, arguments}}}}}}", param=p
            )
        if tc.get("type", "function") != "function":
            raise InvalidRequest(f"{p}.type must be 'function'", param=f"{p}.type")
        call_id = tc.get("id") or f"call_{j}"
        if not isinstance(call_id, str):
            raise InvalidRequest(f"{p}.id must be a string", param=f"{p}.id")
        args = parse_arguments(fn.get("arguments") or "{}", param=f"{p}.function.arguments")
        out.append(ToolCall(call_id, fn["name"], args))
    return tuple(out)


_MESSAGE_FIELDS = (
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "function_call",
    "reasoning_content",
    "reasoning",
    "refusal",
    "audio",
)


def _message(m: Any, i: int) -> Message:
    p = f"messages[{i}]"
    if not isinstance(m, dict):
        raise InvalidRequest(f"{p} must be an object", param=p)
    no_unknown(m, _MESSAGE_FIELDS, where=p)
    role = m.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{p}.role must be one of {', '.join(ROLES)}", param=f"{p}.role")
    if m.get("audio") is not None:
        raise InvalidRequest(f"{p}.audio: {TEXT_ONLY}", param=f"{p}.audio")
    name = string(m, "name", max_len=256, param=f"{p}.name")
    if role in ("system", "developer", "user"):
        return Message(
            "system" if role != "user" else "user",
            _text(m.get("content"), f"{p}.content"),
            name=name,
        )
    if role in ("tool", "function"):
        call_id = m.get("tool_call_id")
        if role == "tool" and not isinstance(call_id, str):
            raise InvalidRequest(f"{p}.tool_call_id is required", param=f"{p}.tool_call_id")
        return Message(
            "tool",
            _text(m.get("content"), f"{p}.content", allow_none=True),
            tool_call_id=call_id,
            name=name,
        )
    calls = _tool_calls(m.get("tool_calls"), f"{p}.tool_calls")
    fc = m.get("function_call")
    if fc is not None:  # the deprecated single call
        calls += _tool_calls([{"id": "call_0", "function": fc}], f"{p}.function_call")
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    if reasoning is not None and not isinstance(reasoning, str):
        raise InvalidRequest(
            f"{p}.reasoning_content must be a string", param=f"{p}.reasoning_content"
        )
    return Message(
        "assistant",
        _text(m.get("content"), f"{p}.content", allow_none=True),
        tool_calls=calls,
        name=name,
        reasoning=reasoning,
    )


def _messages(body: dict[str, Any]) -> tuple[Message, ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    if len(msgs) > 4096:
        raise InvalidRequest("messages has too many entries (at most 4096)", param="messages")
    return tuple(_message(m, i) for i, m in enumerate(msgs))


# -- tools, tool choice, response format


def parse_tool(fn: Any, p: str, *, schema_key: str = "parameters", strict: bool = False) -> Tool:
    """A function tool: name, description, parameters schema (checked when strict)."""
    if not isinstance(fn, dict):
        raise InvalidRequest(f"{p} must be an object", param=p)
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise InvalidRequest(
            f"{p}.name must be 1-128 letters, digits, '_', '-', '.' or ':'", param=f"{p}.name"
        )
    desc = fn.get("description")
    if desc is None:
        desc = ""
    if not isinstance(desc, str):
        raise InvalidRequest(f"{p}.description must be a string", param=f"{p}.description")
    params = fn.get(schema_key)
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise InvalidRequest(
            f"{p}.{schema_key} must be a JSON Schema object", param=f"{p}.{schema_key}"
        )
    if strict:  # refused now, whether or not the call is forced later
        constraints.json_schema(params, strict=True, param=f"{p}.{schema_key}")
    return Tool(ToolSpec(name, desc, params), strict=strict, param=f"{p}.{schema_key}")


def _tools(body: dict[str, Any]) -> tuple[Tool, ...]:
    v = body.get("tools")
    legacy = body.get("functions")
    if v is None and legacy is None:
        return ()
    out = []
    if v is not None:
        if not isinstance(v, list) or len(v) > 512:
            raise InvalidRequest("tools must be a list of at most 512 tools", param="tools")
        for i, t in enumerate(v):
            p = f"tools[{i}]"
            kind = t.get("type") if isinstance(t, dict) else None
            if kind != "function":
                raise InvalidRequest(
                    f"{p}.type {kind!r} is not supported: only function tools",
                    param=f"{p}.type",
                )
            fn = t.get("function")
            strict = (
                boolean(fn, "strict", param=f"{p}.function.strict")
                if isinstance(fn, dict)
                else False
            )
            out.append(parse_tool(fn, f"{p}.function", strict=strict))
    if legacy is not None:
        if not isinstance(legacy, list):
            raise InvalidRequest("functions must be a list", param="functions")
        out += [parse_tool(f, f"functions[{i}]") for i, f in enumerate(legacy)]
    names = [t.spec.name for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidRequest(f"two tools are named {dup!r}", param="tools")
    return tuple(out)


def _tool_choice(body: dict[str, Any]) -> ToolChoice:
    v = body.get("tool_choice")
    if v is None and body.get("function_call") is not None:  # the deprecated form
        fc = body["function_call"]
        v = fc if isinstance(fc, str) else {"type": "function", "function": fc}
        where = "function_call"
    else:
        where = "tool_choice"
    if v is None:
        return ToolChoice()
    if v in ("auto", "none", "required"):
        return ToolChoice(v)
    fn = v.get("function") if isinstance(v, dict) and v.get("type") == "function" else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return ToolChoice("named", fn["name"])
    raise InvalidRequest(
        f"{where} must be 'auto', 'none', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}",
        param=where,
    )


def _response_format(body: dict[str, Any]) -> Optional[ResponseFormat]:
    v = mapping(body, "response_format")
    if v is None:
        return None
    kind = v.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object", param="response_format")
    if kind == "json_schema":
        js = v.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise InvalidRequest(
                "response_format.json_schema must be {name, schema, strict}",
                param="response_format.json_schema",
            )
        strict = boolean(js, "strict", param="response_format.json_schema.strict")
        schema = js.get("schema") or {}
        # Checked by the grammar compiler now: a 400 before any model work.
        constraints.json_schema(schema, strict=strict, param="response_format.json_schema.schema")
        return ResponseFormat(
            "json_schema", schema, strict, param="response_format.json_schema.schema"
        )
    raise InvalidRequest(
        "response_format.type must be 'text', 'json_object' or 'json_schema'",
        param="response_format.type",
    )


def reasoning_switch(effort: Optional[str], param: str) -> tuple[Optional[bool], dict[str, Any]]:
    """An effort level as the template's thinking switch, and as its `reasoning_effort`."""
    if effort is None:
        return None, {}
    if effort not in REASONING_EFFORTS:
        raise InvalidRequest(f"{param} must be one of {', '.join(REASONING_EFFORTS)}", param=param)
    return effort not in ("none", "minimal"), {"reasoning_effort": effort}


def template_kwargs(
    body: dict[str, Any], key: str = "chat_template_kwargs"
) -> tuple[Optional[bool], dict[str, Any]]:
    v = mapping(body, key)
    if v is None:
        return None, {}
    think = v.get("enable_thinking")
    if think is not None and not isinstance(think, bool):
        raise InvalidRequest(
            f"{key}.enable_thinking must be a boolean", param=f"{key}.enable_thinking"
        )
    return think, dict(v)


def _refusals(body: dict[str, Any]) -> None:
    """Fields of the SDK's chat request this server can't honour: 400 naming them."""
    unsupported(body, "audio", "this server answers in text only")
    unsupported(body, "prediction", "predicted outputs are not implemented")
    unsupported(body, "web_search_options", "this server has no web search")
    unsupported(body, "verbosity", "this server has no verbosity control")
    unsupported(body, "moderation", "this server does not moderate")
    unsupported(body, "modalities", "this server answers in text only", ok=(None, ["text"]))
    unsupported(body, "store", "this server does not store chat completions", ok=(None, False))
    unsupported(
        body, "service_tier", "one tier here: auto or default", ok=(None, "auto", "default")
    )
    unsupported(
        body,
        "prompt_cache_retention",
        "the prompt cache is automatic here",
        ok=(None, "in_memory", "in-memory", "24h"),
    )


def parse_chat(body: dict[str, Any], vocab_size: int = 1 << 31) -> OpenAIChat:
    no_unknown(body, CHAT_FIELDS)
    _refusals(body)
    messages = _messages(body)
    common = _common(body, vocab_size, chat=True)
    metadata(body)
    string(body, "safety_identifier")
    string(body, "prompt_cache_key", max_len=1024)  # a hint: the prompt cache is automatic
    mapping(body, "prompt_cache_options")
    effort = body.get("reasoning_effort")
    think, kwargs = reasoning_switch(effort, "reasoning_effort")
    t_think, t_kwargs = template_kwargs(body)
    kwargs.update(t_kwargs)
    if t_think is not None:
        think = t_think
    request = ChatRequest(
        model=common.model,
        params=common.params,
        max_tokens=common.max_tokens,
        messages=messages,
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        parallel_tool_calls=body.get("parallel_tool_calls")
        if boolean(body, "parallel_tool_calls") or body.get("parallel_tool_calls") is False
        else None,
        response_format=_response_format(body),
        reasoning=think,
        template_kwargs=kwargs,
        high_priority=common.high_priority,
    )
    legacy = body.get("functions") is not None and body.get("tools") is None
    return OpenAIChat(request, common.stream, common.include_usage, legacy)


def parse_completion(body: dict[str, Any], vocab_size: int = 1 << 31) -> OpenAICompletion:
    no_unknown(body, COMPLETION_FIELDS)
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
    unsupported(body, "suffix", "fill-in-the-middle is not implemented")
    if number(body, "best_of", 1, 1, integer=True) not in (None, 1):
        raise InvalidRequest("best_of is not supported", param="best_of")
    common = _common(body, vocab_size, chat=False)
    request = ChatRequest(
        model=common.model,
        params=common.params,
        max_tokens=common.max_tokens,
        prompt=prompt,
        high_priority=common.high_priority,
        messages_param="prompt",
    )
    return OpenAICompletion(request, common.stream, common.include_usage, boolean(body, "echo"))


def parsed_tools_mapping(tools: tuple[Tool, ...]) -> Mapping[str, Tool]:
    return {t.spec.name: t for t in tools}
