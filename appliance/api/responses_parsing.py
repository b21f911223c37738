"""OpenAI Responses request parsing: a decoded body to what the Responses front-end needs (the
engine's ChatRequest is made once the stored conversation, if any, is known), or InvalidRequest
naming the bad field.

Every field of the `openai` SDK's ResponseCreateParams is honoured or refused with a 400 that
names it (docs/api.md has the table). Input items are checked here and turned into the
engine's messages by `to_messages`, which reads stored and new items alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from ..engine import constraints
from ..engine.chat import ChatRequest, ResponseFormat, Tool, ToolChoice
from ..engine.output.prompt import Message, ToolCall, ToolSpec, parse_arguments
from ..engine.types import SamplingParams
from ..errors import InvalidRequest
from .fields import boolean, mapping, metadata, no_unknown, number, string
from .parsing import TEXT_ONLY, TOOL_NAME, parse_tool, reasoning_switch

__all__ = [
    "INCLUDABLE",
    "RESPONSE_FIELDS",
    "ResponsesRequest",
    "chat_request",
    "parse_response",
    "to_messages",
]

RESPONSE_FIELDS = (
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "reasoning",
    "max_output_tokens",
    "max_tool_calls",
    "temperature",
    "top_p",
    "top_logprobs",
    "stream",
    "stream_options",
    "store",
    "previous_response_id",
    "metadata",
    "include",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "safety_identifier",
    "service_tier",
    "truncation",
    "user",
    "background",
    "background_options",
    "conversation",
    "prompt",
    "moderation",
    "image",
    "context_management",
    "access_programs",
)
INCLUDABLE = (
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
)
ENCRYPTED = "reasoning.encrypted_content"
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
CUSTOM_INPUT = "input"  # the one string parameter a custom (freeform) tool is given as
MAX_ITEMS = 100_000


@dataclass(frozen=True)
class ResponsesRequest:
    """A parsed POST /v1/responses: the conversation's new part and everything else asked."""

    model: str
    stream: bool
    store: bool
    previous_response_id: Optional[str]
    instructions: Optional[str]
    items: tuple[dict[str, Any], ...]  # the input items (a string input: one user message)
    tools: tuple[Tool, ...]
    custom_tools: frozenset[str]  # names of custom (freeform) tools among `tools`
    tool_choice: ToolChoice
    parallel_tool_calls: Optional[bool]
    response_format: Optional[ResponseFormat]
    reasoning: Optional[bool]
    template_kwargs: Mapping[str, Any]
    params: SamplingParams
    max_output_tokens: Optional[int]
    include_encrypted: bool
    truncation_auto: bool
    echo: Mapping[str, Any] = field(default_factory=dict)  # fields the Response object repeats


# -- input items


def _parts(content: Any, p: str, kinds: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{p} must be a string or a list of content parts", param=p)
    out = []
    for j, part in enumerate(content):
        q = f"{p}[{j}]"
        if not isinstance(part, dict):
            raise InvalidRequest(f"{q} must be an object", param=q)
        kind = part.get("type")
        if kind in ("input_image", "input_file", "input_audio"):
            raise InvalidRequest(f"{q} is an {kind} part: {TEXT_ONLY}", param=f"{q}.type")
        if kind not in kinds:
            raise InvalidRequest(f"{q}.type must be one of {', '.join(kinds)}", param=f"{q}.type")
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{q}.text must be a string", param=f"{q}.text")
        out.append(text)
    return "".join(out)


def _output_text(v: Any, p: str) -> str:
    """A function_call_output's output: a string or a list of input_text parts."""
    return _parts(v, p, ("input_text", "output_text", "text"))


_MESSAGE_KEYS = ("type", "role", "content", "id", "status", "phase")
# Items as clients send them back: the SDK's output models (with `async`, `created_by`), and
# Codex's, whose custom tool calls carry a status.
_CALL_KEYS = (
    "type",
    "call_id",
    "name",
    "arguments",
    "id",
    "status",
    "namespace",
    "caller",
    "async",
)
_CUSTOM_CALL_KEYS = (
    "type",
    "call_id",
    "name",
    "input",
    "id",
    "status",
    "namespace",
    "caller",
    "async",
)
_OUTPUT_KEYS = (
    "type",
    "call_id",
    "output",
    "id",
    "status",
    "name",
    "namespace",
    "caller",
    "created_by",
)
_REASONING_KEYS = ("type", "id", "summary", "content", "encrypted_content", "status")


class _Conversation:
    """Messages from Responses items: calls join the assistant turn before them, reasoning
    the assistant turn after it."""

    def __init__(self, open_sealed: Callable[[str], Optional[str]]) -> None:
        self.out: list[Message] = []
        self.thinking: Optional[str] = None
        self.names: dict[str, str] = {}
        self.open_sealed = open_sealed

    def _assistant(self, content: str, calls: tuple[ToolCall, ...]) -> None:
        last = self.out[-1] if self.out else None
        reasoning, self.thinking = self.thinking, None
        if (
            calls
            and last is not None
            and last.role == "assistant"
            and reasoning is None
            and not content
        ):
            self.out[-1] = Message(
                "assistant",
                last.content,
                tool_calls=last.tool_calls + calls,
                reasoning=last.reasoning,
            )
            return
        self.out.append(Message("assistant", content, tool_calls=calls, reasoning=reasoning))

    def item(self, it: Any, p: str) -> None:
        if not isinstance(it, dict):
            raise InvalidRequest(f"{p} must be an object", param=p)
        kind = it.get("type", "message" if "role" in it else None)
        if kind == "message":
            no_unknown(it, _MESSAGE_KEYS, where=p)
            role = it.get("role")
            if role == "assistant":
                text = _parts(it.get("content"), f"{p}.content", ("output_text", "refusal"))
                self._assistant(text, ())
                return
            if role not in ("user", "system", "developer"):
                raise InvalidRequest(
                    f"{p}.role must be user, assistant, system or developer", param=f"{p}.role"
                )
            text = _parts(it.get("content"), f"{p}.content", ("input_text",))
            self.thinking = None
            self.out.append(Message("user" if role == "user" else "system", text))
        elif kind in ("function_call", "custom_tool_call"):
            custom = kind == "custom_tool_call"
            no_unknown(it, _CUSTOM_CALL_KEYS if custom else _CALL_KEYS, where=p)
            call_id, name = it.get("call_id"), it.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise InvalidRequest(f"{p}: call_id and name are required", param=p)
            if custom:
                freeform = it.get("input")
                if not isinstance(freeform, str):
                    raise InvalidRequest(f"{p}.input must be a string", param=f"{p}.input")
                args: dict[str, Any] = {CUSTOM_INPUT: freeform}
            else:
                raw = it.get("arguments")
                if not isinstance(raw, str):
                    raise InvalidRequest(
                        f"{p}.arguments must be a JSON text", param=f"{p}.arguments"
                    )
                args = parse_arguments(raw, param=f"{p}.arguments")
            self.names[call_id] = name
            self._assistant("", (ToolCall(call_id, name, args),))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            no_unknown(it, _OUTPUT_KEYS, where=p)
            call_id = it.get("call_id")
            if not isinstance(call_id, str):
                raise InvalidRequest(f"{p}.call_id is required", param=f"{p}.call_id")
            text = _output_text(it.get("output"), f"{p}.output")
            self.thinking = None
            self.out.append(
                Message("tool", text, tool_call_id=call_id, name=self.names.get(call_id))
            )
        elif kind == "reasoning":
            no_unknown(it, _REASONING_KEYS, where=p)
            self.thinking = self._reasoning(it, p) or None
        elif kind == "item_reference":
            raise InvalidRequest(
                f"{p}: item references are not supported; send the item, or use "
                "previous_response_id",
                param=f"{p}.type",
            )
        else:
            raise InvalidRequest(
                f"{p}.type {kind!r} is not supported: send message, function_call, "
                "function_call_output, custom_tool_call, custom_tool_call_output or reasoning "
                "items",
                param=f"{p}.type",
            )

    def _reasoning(self, it: dict[str, Any], p: str) -> str:
        """The thinking of a reasoning item: what this server sealed (encrypted_content), else
        its reasoning text, else its summary."""
        sealed = it.get("encrypted_content")
        if sealed is not None:
            if not isinstance(sealed, str):
                raise InvalidRequest(
                    f"{p}.encrypted_content must be a string", param=f"{p}.encrypted_content"
                )
            opened = self.open_sealed(sealed)
            if opened is not None:
                return opened
        for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
            v = it.get(key)
            if v is None:
                continue
            if not isinstance(v, list):
                raise InvalidRequest(f"{p}.{key} must be a list", param=f"{p}.{key}")
            text = _parts(v, f"{p}.{key}", (kind,))
            if text:
                return text
        return ""


def to_messages(
    items: Sequence[Any],
    *,
    instructions: Optional[str] = None,
    open_sealed: Callable[[str], Optional[str]] = lambda s: None,
    where: str = "input",
) -> tuple[Message, ...]:
    """The engine's messages of a conversation's items (instructions first, as a system
    message); raises InvalidRequest naming the bad item."""
    conv = _Conversation(open_sealed)
    if instructions:
        conv.out.append(Message("system", instructions))
    for i, it in enumerate(items):
        conv.item(it, f"{where}[{i}]")
    return tuple(conv.out)


def _items(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    v = body.get("input")
    if v is None:
        return ()
    if isinstance(v, str):
        return ({"type": "message", "role": "user", "content": v},)
    if not isinstance(v, list) or len(v) > MAX_ITEMS:
        raise InvalidRequest("input must be a string or a list of items", param="input")
    return tuple(v)


# -- tools


def _tools(body: dict[str, Any]) -> tuple[tuple[Tool, ...], frozenset[str]]:
    v = body.get("tools")
    if v is None:
        return (), frozenset()
    if not isinstance(v, list) or len(v) > 512:
        raise InvalidRequest("tools must be a list of at most 512 tools", param="tools")
    out: list[Tool] = []
    custom: set[str] = set()
    for i, t in enumerate(v):
        p = f"tools[{i}]"
        if not isinstance(t, dict):
            raise InvalidRequest(f"{p} must be an object", param=p)
        kind = t.get("type")
        if kind == "function":
            no_unknown(
                t,
                (
                    "type",
                    "name",
                    "description",
                    "parameters",
                    "strict",
                    "defer_loading",
                    "allowed_callers",
                    "async",
                    "output_schema",
                ),
                where=p,
            )
            _tool_extras(t, p)
            if t.get("output_schema") is not None:
                raise InvalidRequest(
                    f"{p}.output_schema is not supported", param=f"{p}.output_schema"
                )
            strict = boolean(t, "strict", param=f"{p}.strict")
            out.append(parse_tool(t, p, strict=strict))
        elif kind == "custom":
            no_unknown(
                t,
                (
                    "type",
                    "name",
                    "description",
                    "format",
                    "defer_loading",
                    "allowed_callers",
                    "async",
                ),
                where=p,
            )
            _tool_extras(t, p)
            out.append(_custom_tool(t, p))
            custom.add(out[-1].spec.name)
        else:
            raise InvalidRequest(
                f"{p}.type {kind!r} is a built-in tool this server does not run: send function "
                "tools (or custom tools)",
                param=f"{p}.type",
            )
    names = [t.spec.name for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidRequest(f"two tools are named {dup!r}", param="tools")
    return tuple(out), frozenset(custom)


def _tool_extras(t: dict[str, Any], p: str) -> None:
    if boolean(t, "defer_loading", param=f"{p}.defer_loading"):
        raise InvalidRequest(
            f"{p}.defer_loading: tool search is not supported here", param=f"{p}.defer_loading"
        )
    if boolean(t, "async", param=f"{p}.async"):
        raise InvalidRequest(f"{p}.async: asynchronous tools are not supported", param=f"{p}.async")
    if t.get("allowed_callers") not in (None, ["direct"]):
        raise InvalidRequest(f"{p}.allowed_callers: only ['direct']", param=f"{p}.allowed_callers")


def _custom_tool(t: dict[str, Any], p: str) -> Tool:
    """A freeform tool, given to the model as a function of one string, `input`. A grammar
    format is described to the model, not enforced (docs/api.md)."""
    name = t.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise InvalidRequest(
            f"{p}.name must be 1-128 letters, digits, '_', '-', '.' or ':'", param=f"{p}.name"
        )
    desc = string(t, "description", max_len=1 << 20, param=f"{p}.description") or ""
    fmt = mapping(t, "format", param=f"{p}.format")
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "text":
            no_unknown(fmt, ("type",), where=f"{p}.format")
        elif kind == "grammar":
            no_unknown(fmt, ("type", "syntax", "definition"), where=f"{p}.format")
            syntax = fmt.get("syntax")
            definition = fmt.get("definition")
            if syntax not in ("lark", "regex") or not isinstance(definition, str):
                raise InvalidRequest(
                    f"{p}.format must be {{type: grammar, syntax: lark | regex, definition}}",
                    param=f"{p}.format",
                )
            desc += (
                f"\n\nThe input must follow this {syntax} "
                f"{'grammar' if syntax == 'lark' else 'expression'}:\n{definition}"
            )
        else:
            raise InvalidRequest(
                f"{p}.format.type must be 'text' or 'grammar'", param=f"{p}.format.type"
            )
    params = {
        "type": "object",
        "properties": {CUSTOM_INPUT: {"type": "string", "description": "The tool's input."}},
        "required": [CUSTOM_INPUT],
    }
    return Tool(ToolSpec(name, desc, params), param=p)


def _tool_choice(
    body: dict[str, Any], tools: tuple[Tool, ...]
) -> tuple[ToolChoice, tuple[Tool, ...]]:
    """The choice, and the tools offered (allowed_tools narrows them)."""
    v = body.get("tool_choice")
    if v is None:
        return ToolChoice(), tools
    if v in ("auto", "none", "required"):
        return ToolChoice(v), tools
    if not isinstance(v, dict):
        raise InvalidRequest(
            "tool_choice must be 'auto', 'none', 'required', {type: function, name}, "
            "{type: custom, name} or {type: allowed_tools, mode, tools}",
            param="tool_choice",
        )
    kind = v.get("type")
    if kind in ("function", "custom"):
        no_unknown(v, ("type", "name"), where="tool_choice")
        name = string(v, "name", max_len=128, param="tool_choice.name", required=True)
        return ToolChoice("named", name), tools
    if kind == "allowed_tools":
        no_unknown(v, ("type", "mode", "tools"), where="tool_choice")
        mode = v.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise InvalidRequest(
                "tool_choice.mode must be 'auto' or 'required'", param="tool_choice.mode"
            )
        allowed = v.get("tools")
        if not isinstance(allowed, list) or not all(
            isinstance(a, dict) and a.get("type") in ("function", "custom") for a in allowed
        ):
            raise InvalidRequest(
                "tool_choice.tools must list {type: function, name} entries",
                param="tool_choice.tools",
            )
        names = {a.get("name") for a in allowed if isinstance(a.get("name"), str)}
        return ToolChoice(mode), tuple(t for t in tools if t.spec.name in names)
    raise InvalidRequest(
        f"tool_choice.type {kind!r} names a built-in tool this server does not run",
        param="tool_choice.type",
    )


# -- text format, reasoning


def _text(body: dict[str, Any]) -> Optional[ResponseFormat]:
    v = mapping(body, "text")
    if v is None:
        return None
    no_unknown(v, ("format", "verbosity"), where="text")
    if v.get("verbosity") not in (None, "low", "medium", "high"):
        raise InvalidRequest(
            "text.verbosity must be 'low', 'medium' or 'high'", param="text.verbosity"
        )
    fmt = mapping(v, "format", param="text.format")
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        no_unknown(fmt, ("type",), where="text.format")
        return None
    if kind == "json_object":
        no_unknown(fmt, ("type",), where="text.format")
        return ResponseFormat("json_object", param="text.format")
    if kind == "json_schema":
        no_unknown(fmt, ("type", "name", "schema", "strict", "description"), where="text.format")
        string(fmt, "name", max_len=64, param="text.format.name", required=True)
        string(fmt, "description", max_len=1 << 16, param="text.format.description")
        schema = fmt.get("schema")
        where = "text.format.schema"
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{where} must be a JSON Schema object", param=where)
        strict = boolean(fmt, "strict", param="text.format.strict")
        constraints.json_schema(schema, strict=strict, param=where)  # a 400 before model work
        return ResponseFormat("json_schema", schema, strict, param=where)
    raise InvalidRequest(
        "text.format.type must be 'text', 'json_object' or 'json_schema'",
        param="text.format.type",
    )


def _reasoning(body: dict[str, Any]) -> tuple[Optional[bool], dict[str, Any]]:
    v = mapping(body, "reasoning")
    if v is None:
        return None, {}
    no_unknown(v, ("effort", "summary", "generate_summary", "context", "mode"), where="reasoning")
    for key in ("summary", "generate_summary"):
        if v.get(key) not in (None, "auto", "concise", "detailed"):
            raise InvalidRequest(
                f"reasoning.{key} must be 'auto', 'concise' or 'detailed'",
                param=f"reasoning.{key}",
            )
    if v.get("context") not in (None, "auto"):
        raise InvalidRequest(
            "reasoning.context: only 'auto' (the reasoning the input carries)",
            param="reasoning.context",
        )
    if v.get("mode") not in (None, "standard"):
        raise InvalidRequest("reasoning.mode: only 'standard'", param="reasoning.mode")
    effort = v.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise InvalidRequest(
            f"reasoning.effort must be one of {', '.join(EFFORTS)}", param="reasoning.effort"
        )
    return reasoning_switch("high" if effort == "max" else effort, "reasoning.effort")


def _refusals(body: dict[str, Any]) -> None:
    for name, why in (
        ("background", "background responses are not supported; stream instead"),
        ("conversation", "conversations are not stored here; use previous_response_id"),
        ("prompt", "stored prompts are not supported; send the input"),
        ("moderation", "this server does not moderate"),
        ("image", "this server reads and writes text only"),
        ("context_management", "context compaction is not supported"),
        ("access_programs", "no access programs here"),
        ("background_options", "background responses are not supported"),
    ):
        v = body.get(name)
        if v is not None and not (name == "background" and v is False):
            raise InvalidRequest(f"{name} is not supported: {why}", param=name)
    if body.get("service_tier") not in (None, "auto", "default"):
        raise InvalidRequest("service_tier: one tier here, auto or default", param="service_tier")
    if body.get("truncation") not in (None, "auto", "disabled"):
        raise InvalidRequest("truncation must be 'auto' or 'disabled'", param="truncation")
    if body.get("prompt_cache_retention") not in (None, "in_memory", "in-memory", "24h"):
        raise InvalidRequest(
            "prompt_cache_retention must be 'in_memory' or '24h'", param="prompt_cache_retention"
        )
    top = number(body, "top_logprobs", 0, 20, integer=True)
    if top:
        raise InvalidRequest("top_logprobs is not supported on /v1/responses", param="top_logprobs")
    so = mapping(body, "stream_options")
    if so is not None:
        no_unknown(so, ("include_obfuscation",), where="stream_options")
        boolean(so, "include_obfuscation", param="stream_options.include_obfuscation")
    mapping(body, "prompt_cache_options")
    number(body, "max_tool_calls", 0, 1 << 20, integer=True)  # built-in tools: none run here


def _include(body: dict[str, Any]) -> bool:
    v = body.get("include")
    if v is None:
        return False
    if not isinstance(v, list):
        raise InvalidRequest("include must be a list", param="include")
    for i, name in enumerate(v):
        if name == ENCRYPTED:
            continue
        what = "a known value" if name not in INCLUDABLE else "supported here"
        raise InvalidRequest(
            f"include[{i}] {name!r} is not {what}: only {ENCRYPTED!r}", param=f"include[{i}]"
        )
    return ENCRYPTED in v


def parse_response(
    body: dict[str, Any], open_sealed: Callable[[str], Optional[str]] = lambda s: None
) -> ResponsesRequest:
    """POST /v1/responses."""
    no_unknown(body, RESPONSE_FIELDS)
    _refusals(body)
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise InvalidRequest("model must be a non-empty string", param="model")
    items = _items(body)
    instructions = string(body, "instructions", max_len=1 << 24)
    previous = string(body, "previous_response_id", max_len=256)
    if not items and previous is None:
        raise InvalidRequest("input is required", param="input")
    to_messages(items, open_sealed=open_sealed)  # checks every item now
    tools, custom = _tools(body)
    choice, offered = _tool_choice(body, tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    response_format = _text(body)
    think, kwargs = _reasoning(body)
    max_out = number(body, "max_output_tokens", 1, 1 << 24, integer=True)
    # Greedy unless asked otherwise, as on every front-end of this server.
    temperature = number(body, "temperature", 0, 2, 0.0)
    top_p = number(body, "top_p", 0, 1, 1.0, lo_open=True)
    md = metadata(body)
    for key in ("user", "safety_identifier", "prompt_cache_key"):
        string(body, key, max_len=1024)
    params = SamplingParams(
        max_tokens=int(max_out or 1),
        temperature=float(temperature or 0.0),
        top_p=float(top_p if top_p is not None else 1.0),
    )
    store = boolean(body, "store", True)
    echo = {
        "instructions": instructions,
        "max_output_tokens": None if max_out is None else int(max_out),
        "metadata": md or {},
        "parallel_tool_calls": parallel if parallel is not None else True,
        "previous_response_id": previous,
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": {
            "effort": (body.get("reasoning") or {}).get("effort"),
            "summary": (body.get("reasoning") or {}).get("summary"),
        },
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": "default",
        "store": store,
        "temperature": temperature,
        "text": {
            "format": (body.get("text") or {}).get("format") or {"type": "text"},
            "verbosity": (body.get("text") or {}).get("verbosity") or "medium",
        },
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": list(body.get("tools") or []),
        "top_p": top_p,
        "truncation": body.get("truncation") or "disabled",
        "user": body.get("user"),
    }
    return ResponsesRequest(
        model=model,
        stream=boolean(body, "stream"),
        store=store,
        previous_response_id=previous,
        instructions=instructions,
        items=items,
        tools=offered,
        custom_tools=custom,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        response_format=response_format,
        reasoning=think,
        template_kwargs=kwargs,
        params=params,
        max_output_tokens=None if max_out is None else int(max_out),
        include_encrypted=_include(body),
        truncation_auto=body.get("truncation") == "auto",
        echo=echo,
    )


def chat_request(parsed: ResponsesRequest, messages: tuple[Message, ...]) -> ChatRequest:
    """The engine's request for a parsed Responses request and its whole conversation."""
    return ChatRequest(
        model=parsed.model,
        params=parsed.params,
        max_tokens=parsed.max_output_tokens,
        messages=messages,
        tools=parsed.tools,
        tool_choice=parsed.tool_choice,
        parallel_tool_calls=parsed.parallel_tool_calls,
        response_format=parsed.response_format,
        reasoning=parsed.reasoning,
        template_kwargs=parsed.template_kwargs,
        messages_param="input",
    )


def arguments_input(arguments: str) -> str:
    """A custom tool call's freeform input, from the arguments its function form got."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get(CUSTOM_INPUT), str):
        return str(value[CUSTOM_INPUT])
    return arguments
