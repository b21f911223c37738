"""Anthropic Messages request parsing: a decoded body to the engine's ChatRequest (plus what only
the wire format needs), or InvalidRequest naming the bad field.

Every field of the `anthropic` SDK's MessageCreateParams is honoured or refused with a 400 that
names it (docs/api.md has the table); a field the API does not have is refused, as Anthropic
does. Agents' habits are accepted: `cache_control` on any block (prompt caching is automatic
here), `metadata.user_id`, a `max_tokens` above the model's limit (capped to it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

from ..engine import constraints
from ..engine.chat import ChatRequest, ResponseFormat, Tool, ToolChoice
from ..engine.output.prompt import Message, ToolCall
from ..engine.types import SamplingParams
from ..errors import InvalidRequest
from .fields import boolean, mapping, number, string
from .parsing import TEXT_ONLY, parse_tool

__all__ = ["COUNT_FIELDS", "MESSAGES_FIELDS", "AnthropicMessages", "parse_messages"]

# The SDK's MessageCreateParams, `stream`, and the sampling knobs older clients still send.
MESSAGES_FIELDS = (
    "model",
    "max_tokens",
    "messages",
    "system",
    "stream",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
    "service_tier",
    "speed",
    "inference_geo",
    "cache_control",
    "container",
    "diagnostics",
    "user_profile_id",
    "workspace_id",
    "mcp_servers",
    "context_management",
)
# count_tokens takes the same body (max_tokens and the rest are then optional and unused).
COUNT_FIELDS = MESSAGES_FIELDS

MAX_STOP_SEQUENCES = 16
MAX_MESSAGES = 100_000
EFFORTS = ("low", "medium", "high", "xhigh", "max")
# What a template's `reasoning_effort` understands, for Anthropic's levels.
_EFFORT_KWARG = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "high"}


@dataclass(frozen=True)
class AnthropicMessages:
    """A parsed Messages request: the engine's request, and how to answer it."""

    request: ChatRequest
    stream: bool
    model: str  # the name the client sent, echoed in the answer
    thinking: bool  # thinking blocks are shown (thinking enabled or adaptive)
    thinking_omitted: bool  # display: omitted (blocks carry no text, only the signature)


def _extra(body: dict[str, Any], known: Iterable[str], where: str = "") -> None:
    """400 naming the first field the API does not have (Anthropic's own wording)."""
    allowed = set(known)
    for k in body:
        if k not in allowed:
            name = f"{where}.{k}" if where else k
            raise InvalidRequest(f"{name}: Extra inputs are not permitted", param=name)


def _obj(v: Any, p: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise InvalidRequest(f"{p}: Input should be an object", param=p)
    return v


def _cache_control(block: dict[str, Any], p: str) -> None:
    """Accepted and checked: prompt caching is automatic here, whatever the breakpoints."""
    cc = block.get("cache_control")
    if cc is None:
        return
    cc = _obj(cc, f"{p}.cache_control")
    _extra(cc, ("type", "ttl"), f"{p}.cache_control")
    if cc.get("type") != "ephemeral":
        raise InvalidRequest(
            f"{p}.cache_control.type must be 'ephemeral'", param=f"{p}.cache_control.type"
        )
    if cc.get("ttl") not in (None, "5m", "1h"):
        raise InvalidRequest(
            f"{p}.cache_control.ttl must be '5m' or '1h'", param=f"{p}.cache_control.ttl"
        )


def _text_block(b: dict[str, Any], p: str) -> str:
    _extra(b, ("type", "text", "cache_control", "citations"), p)
    _cache_control(b, p)
    text = b.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"{p}.text: Input should be a string", param=f"{p}.text")
    # Citations describe where an earlier answer's text came from: nothing to render.
    c = b.get("citations")
    if c is not None and not isinstance(c, list):
        raise InvalidRequest(f"{p}.citations: Input should be a list", param=f"{p}.citations")
    return text


def _refuse_block(kind: Any, p: str) -> None:
    if kind in ("image", "document"):
        raise InvalidRequest(f"{p} is a {kind} block: {TEXT_ONLY} blocks", param=f"{p}.type")
    raise InvalidRequest(
        f"{p}.type {kind!r} is not supported here: send text, tool_use, tool_result, thinking "
        "or redacted_thinking blocks",
        param=f"{p}.type",
    )


def _texts(content: Any, p: str) -> str:
    """A string, or a list of text blocks (the system prompt, a tool result's content)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{p}: Input should be a string or a list of blocks", param=p)
    parts = []
    for j, b in enumerate(content):
        q = f"{p}[{j}]"
        b = _obj(b, q)
        if b.get("type") != "text":
            _refuse_block(b.get("type"), q)
        parts.append(_text_block(b, q))
    return "\n\n".join(parts)


def _system(body: dict[str, Any]) -> Optional[Message]:
    s = body.get("system")
    if s is None:
        return None
    text = _texts(s, "system")
    return Message("system", text) if text else None


class _Turns:
    """Internal messages built from Anthropic turns: consecutive turns of one role are
    combined (as Anthropic does), tool results become tool messages in their order."""

    def __init__(self) -> None:
        self.out: list[Message] = []
        self.names: dict[str, str] = {}  # tool_use id -> tool name, for tool results

    def add(self, m: Message) -> None:
        last = self.out[-1] if self.out else None
        if last is not None and m.role == last.role and m.role in ("user", "assistant"):
            if m.role == "assistant" and last.tool_calls and m.content:
                self.out.append(m)  # text after calls: a turn of its own
                return
            sep = "\n\n" if last.content and m.content else ""
            reasoning = "\n\n".join(r for r in (last.reasoning, m.reasoning) if r) or None
            self.out[-1] = Message(
                m.role,
                last.content + sep + m.content,
                tool_calls=last.tool_calls + m.tool_calls,
                reasoning=reasoning,
            )
            return
        self.out.append(m)

    def user(self, content: Any, p: str) -> None:
        if isinstance(content, str):
            self.add(Message("user", content))
            return
        if not isinstance(content, list):
            raise InvalidRequest(f"{p}: Input should be a string or a list of blocks", param=p)
        texts: list[str] = []
        for j, b in enumerate(content):
            q = f"{p}[{j}]"
            b = _obj(b, q)
            kind = b.get("type")
            if kind == "text":
                texts.append(_text_block(b, q))
            elif kind == "tool_result":
                self.out.append(self._tool_result(b, q))
            else:
                _refuse_block(kind, q)
        if texts or not content:
            self.add(Message("user", "\n\n".join(texts)))

    def _tool_result(self, b: dict[str, Any], q: str) -> Message:
        _extra(
            b, ("type", "tool_use_id", "content", "is_error", "cache_control", "toolset_name"), q
        )
        _cache_control(b, q)
        call_id = b.get("tool_use_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequest(f"{q}.tool_use_id: Field required", param=f"{q}.tool_use_id")
        content = b.get("content")
        text = "" if content is None else _texts(content, f"{q}.content")
        if boolean(b, "is_error", param=f"{q}.is_error"):
            text = f"Error: {text}" if text else "Error"
        return Message("tool", text, tool_call_id=call_id, name=self.names.get(call_id))

    def assistant(self, content: Any, p: str) -> None:
        if isinstance(content, str):
            self.add(Message("assistant", content))
            return
        if not isinstance(content, list):
            raise InvalidRequest(f"{p}: Input should be a string or a list of blocks", param=p)
        texts: list[str] = []
        calls: list[ToolCall] = []
        thoughts: list[str] = []
        for j, b in enumerate(content):
            q = f"{p}[{j}]"
            b = _obj(b, q)
            kind = b.get("type")
            if kind == "text":
                texts.append(_text_block(b, q))
            elif kind == "tool_use":
                _extra(
                    b,
                    ("type", "id", "name", "input", "cache_control", "caller", "toolset_name"),
                    q,
                )
                _cache_control(b, q)
                call_id, name = b.get("id"), b.get("name")
                if not isinstance(call_id, str) or not isinstance(name, str):
                    raise InvalidRequest(f"{q}: id and name are required", param=q)
                args = b.get("input", {})
                if not isinstance(args, dict):
                    raise InvalidRequest(
                        f"{q}.input: Input should be an object", param=f"{q}.input"
                    )
                self.names[call_id] = name
                calls.append(ToolCall(call_id, name, args))
            elif kind == "thinking":
                _extra(b, ("type", "thinking", "signature", "cache_control"), q)
                thought = b.get("thinking")
                if not isinstance(thought, str):
                    raise InvalidRequest(
                        f"{q}.thinking: Input should be a string", param=f"{q}.thinking"
                    )
                string(b, "signature", max_len=1 << 20, param=f"{q}.signature")
                if thought:
                    thoughts.append(thought)
            elif kind == "redacted_thinking":
                # Opaque thinking of another server: nothing here can read it.
                _extra(b, ("type", "data", "cache_control"), q)
                string(b, "data", max_len=1 << 24, param=f"{q}.data", required=True)
            else:
                _refuse_block(kind, q)
        self.add(
            Message(
                "assistant",
                "\n\n".join(texts),
                tool_calls=tuple(calls),
                reasoning="\n\n".join(thoughts) or None,
            )
        )


def _messages(body: dict[str, Any]) -> tuple[Message, ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    if len(msgs) > MAX_MESSAGES:
        raise InvalidRequest(f"messages: at most {MAX_MESSAGES} messages", param="messages")
    turns = _Turns()
    system = _system(body)
    if system is not None:
        turns.out.append(system)
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        m = _obj(m, p)
        _extra(m, ("role", "content"), p)
        role = m.get("role")
        if "content" not in m:
            raise InvalidRequest(f"{p}.content: Field required", param=f"{p}.content")
        content = m["content"]
        if role == "user":
            turns.user(content, f"{p}.content")
        elif role == "assistant":
            turns.assistant(content, f"{p}.content")
        elif role == "system":
            turns.add(Message("system", _texts(content, f"{p}.content")))
        else:
            raise InvalidRequest(
                f"{p}.role: Input should be 'user' or 'assistant'", param=f"{p}.role"
            )
    return tuple(turns.out)


def _tools(body: dict[str, Any]) -> tuple[Tool, ...]:
    v = body.get("tools")
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > 512:
        raise InvalidRequest("tools: Input should be a list of at most 512 tools", param="tools")
    out = []
    for i, t in enumerate(v):
        p = f"tools[{i}]"
        t = _obj(t, p)
        kind = t.get("type")
        if kind not in (None, "custom"):
            raise InvalidRequest(
                f"{p}.type {kind!r} is a server tool: this server runs none; send client tools "
                "(name, description, input_schema)",
                param=f"{p}.type",
            )
        _extra(
            t,
            (
                "type",
                "name",
                "description",
                "input_schema",
                "cache_control",
                "strict",
                "eager_input_streaming",
                "defer_loading",
                "input_examples",
                "allowed_callers",
            ),
            p,
        )
        _cache_control(t, p)
        boolean(t, "eager_input_streaming", param=f"{p}.eager_input_streaming")
        if boolean(t, "defer_loading", param=f"{p}.defer_loading"):
            raise InvalidRequest(
                f"{p}.defer_loading: tool search is not supported here; send the tool loaded",
                param=f"{p}.defer_loading",
            )
        callers = t.get("allowed_callers")
        if callers not in (None, ["direct"]):
            raise InvalidRequest(
                f"{p}.allowed_callers: only ['direct'] (the model calls tools itself)",
                param=f"{p}.allowed_callers",
            )
        if not isinstance(t.get("input_schema"), dict):
            raise InvalidRequest(
                f"{p}.input_schema: a JSON Schema object is required", param=f"{p}.input_schema"
            )
        strict = boolean(t, "strict", param=f"{p}.strict")
        spec = dict(t)
        examples = t.get("input_examples")
        if examples is not None:
            if not isinstance(examples, list) or not all(isinstance(x, dict) for x in examples):
                raise InvalidRequest(
                    f"{p}.input_examples: Input should be a list of objects",
                    param=f"{p}.input_examples",
                )
            import json

            # Examples are a prompt hint: they go to the model with the description.
            lines = "\n".join(json.dumps(x, ensure_ascii=False) for x in examples)
            spec["description"] = f"{t.get('description') or ''}\n\nExample inputs:\n{lines}"
        out.append(parse_tool(spec, p, schema_key="input_schema", strict=strict))
    names = [t.spec.name for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidRequest(f"tools: two tools are named {dup!r}", param="tools")
    return tuple(out)


def _tool_choice(body: dict[str, Any]) -> tuple[ToolChoice, Optional[bool]]:
    """The choice, and the parallel switch: False when parallel use is disabled, else None
    (a free answer may make several calls, a forced one makes one)."""
    v = body.get("tool_choice")
    if v is None:
        return ToolChoice(), None
    v = _obj(v, "tool_choice")
    kind = v.get("type")
    known = {
        "auto": ("type", "disable_parallel_tool_use"),
        "any": ("type", "disable_parallel_tool_use"),
        "tool": ("type", "name", "disable_parallel_tool_use"),
        "none": ("type",),
    }
    if not isinstance(kind, str) or kind not in known:
        raise InvalidRequest(
            "tool_choice.type must be 'auto', 'any', 'tool' or 'none'", param="tool_choice.type"
        )
    _extra(v, known[kind], "tool_choice")
    single = boolean(v, "disable_parallel_tool_use", param="tool_choice.disable_parallel_tool_use")
    parallel = False if single else None
    if kind == "tool":
        name = string(v, "name", max_len=128, param="tool_choice.name", required=True)
        return ToolChoice("named", name), parallel
    return ToolChoice({"auto": "auto", "any": "required", "none": "none"}[kind]), parallel


@dataclass(frozen=True)
class _Thinking:
    on: Optional[bool]
    budget: Optional[int]
    shown: bool
    omitted: bool


def _thinking(body: dict[str, Any]) -> _Thinking:
    v = body.get("thinking")
    if v is None:
        # Anthropic thinks only when asked: the template's switch is turned off.
        return _Thinking(False, None, False, False)
    v = _obj(v, "thinking")
    kind = v.get("type")
    if kind == "disabled":
        _extra(v, ("type",), "thinking")
        return _Thinking(False, None, False, False)
    if kind not in ("enabled", "adaptive"):
        raise InvalidRequest(
            "thinking.type must be 'enabled', 'adaptive' or 'disabled'", param="thinking.type"
        )
    _extra(
        v,
        ("type", "budget_tokens", "display") if kind == "enabled" else ("type", "display"),
        "thinking",
    )
    display = v.get("display")
    if display not in (None, "summarized", "omitted"):
        raise InvalidRequest(
            "thinking.display must be 'summarized' or 'omitted'", param="thinking.display"
        )
    budget = None
    if kind == "enabled":
        if v.get("budget_tokens") is None:
            raise InvalidRequest(
                "thinking.budget_tokens: Field required", param="thinking.budget_tokens"
            )
        b = number(v, "budget_tokens", 1, 1 << 24, integer=True, param="thinking.budget_tokens")
        budget = int(b) if b is not None else None
    return _Thinking(True, budget, True, display == "omitted")


def _output_config(body: dict[str, Any]) -> tuple[Optional[ResponseFormat], dict[str, Any]]:
    v = mapping(body, "output_config")
    if v is None:
        return None, {}
    _extra(v, ("effort", "format"), "output_config")
    kwargs: dict[str, Any] = {}
    effort = v.get("effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise InvalidRequest(
                f"output_config.effort must be one of {', '.join(EFFORTS)}",
                param="output_config.effort",
            )
        kwargs["reasoning_effort"] = _EFFORT_KWARG[effort]
    fmt = v.get("format")
    if fmt is None:
        return None, kwargs
    fmt = _obj(fmt, "output_config.format")
    _extra(fmt, ("type", "schema"), "output_config.format")
    if fmt.get("type") != "json_schema":
        raise InvalidRequest(
            "output_config.format.type must be 'json_schema'", param="output_config.format.type"
        )
    schema = fmt.get("schema")
    where = "output_config.format.schema"
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where}: Input should be an object", param=where)
    constraints.json_schema(schema, strict=False, param=where)  # a 400 before any model work
    return ResponseFormat("json_schema", schema, False, param=where), kwargs


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop_sequences")
    if v is None:
        return ()
    if (
        not isinstance(v, list)
        or len(v) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in v)
    ):
        raise InvalidRequest(
            f"stop_sequences must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings "
            "(up to 256 characters)",
            param="stop_sequences",
        )
    return tuple(v)


def _refusals(body: dict[str, Any]) -> None:
    """Fields of the API this server can't honour: 400 naming them."""
    for name, why in (
        ("container", "this server runs no code-execution containers"),
        ("diagnostics", "prompt-cache diagnostics are not available"),
        ("context_management", "context editing is not supported; send the context to use"),
    ):
        if body.get(name) is not None:
            raise InvalidRequest(f"{name} is not supported: {why}", param=name)
    if body.get("mcp_servers") not in (None, []):
        raise InvalidRequest(
            "mcp_servers is not supported: this server connects to no MCP servers; give the "
            "tools as client tools",
            param="mcp_servers",
        )
    if body.get("service_tier") not in (None, "auto", "standard_only"):
        raise InvalidRequest("service_tier must be 'auto' or 'standard_only'", param="service_tier")
    if body.get("speed") not in (None, "standard", "fast"):
        raise InvalidRequest("speed must be 'standard' or 'fast'", param="speed")
    for name in ("inference_geo", "user_profile_id", "workspace_id"):
        string(body, name, max_len=256)
    md = mapping(body, "metadata")
    if md is not None:
        _extra(md, ("user_id",), "metadata")
        string(md, "user_id", max_len=512, param="metadata.user_id")
    _cache_control(body, "")


def parse_messages(body: dict[str, Any], *, count: bool = False) -> AnthropicMessages:
    """POST /v1/messages (or, with `count`, /v1/messages/count_tokens) as a ChatRequest."""
    _extra(body, COUNT_FIELDS if count else MESSAGES_FIELDS)
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise InvalidRequest("model: Field required (a non-empty string)", param="model")
    if not count and body.get("max_tokens") is None:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    # Above the model's limit is capped to it (agents ask for 32,000 and more).
    max_tokens = number(body, "max_tokens", 1, 1 << 24, integer=True)
    _refusals(body)
    stream = boolean(body, "stream")
    # Greedy unless asked otherwise, as on every front-end of this server.
    temperature = number(body, "temperature", 0, 1, 0.0)
    top_p = number(body, "top_p", 0, 1, 1.0, lo_open=True)
    top_k = number(body, "top_k", 0, 1 << 20, 0, integer=True)
    messages = _messages(body)
    tools = _tools(body)
    choice, parallel = _tool_choice(body)
    thinking = _thinking(body)
    response_format, kwargs = _output_config(body)
    params = SamplingParams(
        max_tokens=int(max_tokens or 1),
        temperature=float(temperature or 0.0),
        top_p=float(top_p if top_p is not None else 1.0),
        top_k=int(top_k or 0),
        stop=_stops(body),
    )
    request = ChatRequest(
        model=model,
        params=params,
        max_tokens=None if max_tokens is None else int(max_tokens),
        messages=messages,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        response_format=response_format,
        reasoning=thinking.on,
        reasoning_budget=thinking.budget,
        template_kwargs=kwargs,
        continue_final=True,
    )
    return AnthropicMessages(request, stream, model, thinking.shown, thinking.omitted)
