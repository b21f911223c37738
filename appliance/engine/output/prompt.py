"""Prompts from conversations: the internal message shape, the model's own chat template with
tools, and a fallback for templates that know no tools.

Every front-end (OpenAI chat, Anthropic messages, OpenAI responses) turns its request into a
tuple of `Message` and a tuple of `ToolSpec`; `render` makes the prompt's token ids:

    ids = render(tokenizer, messages, tools=specs, tool_choice="auto", template_kwargs={})

`Message` (frozen):

    role          "system" | "user" | "assistant" | "tool"
    content       the text ("" when an assistant turn only calls tools)
    tool_calls    assistant turns: the calls it made, ToolCall(id, name, arguments: dict)
    tool_call_id  tool turns: the id of the call this result answers
    name          tool turns: the function's name
    reasoning     assistant turns: their thinking, given to the template as `reasoning_content`
                  (and `thinking`); whether it is shown again is the template's business

Templates get OpenAI-shaped dicts: `tool_calls: [{"id", "type": "function", "function":
{"name", "arguments": {...}}}]` with the arguments as a mapping (templates write
`arguments|tojson` or iterate its items), tools as `{"type": "function", "function": {...}}`.

Fallback: a template that renders no tools (SmolLM2's ChatML, the demo model's) gets them
through `fallback_system_prompt` appended to the system prompt (one is added when the
conversation has none); earlier calls are written into the assistant text as the same
`<tool_call>` blocks, and tool results go in a user turn inside `<tool_response>` tags, so a
conversation of several turns reads the same way throughout. Such a model's calls are parsed
by the hermes family. tool_choice "none" renders no tools at all.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from ...errors import InvalidRequest

__all__ = [
    "FALLBACK_INSTRUCTIONS",
    "Message",
    "ToolCall",
    "ToolChoice",
    "ToolSpec",
    "fallback_messages",
    "fallback_system_prompt",
    "parse_arguments",
    "render",
    "render_text",
    "template_dicts",
    "template_supports_tools",
]

ROLES = ("system", "user", "assistant", "tool")
# "auto" | "none" | "required" | a function name that must be called
ToolChoice = str


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: its name, description and parameters JSON Schema."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )

    def openai(self) -> dict[str, Any]:
        """The `{"type": "function", "function": {...}}` form chat templates expect."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = dict(self.parameters)
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    """A call an assistant turn made: id, function name and arguments (a mapping)."""

    id: str
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, in the shape every front-end produces (module docstring)."""

    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: Optional[str] = None
    name: Optional[str] = None
    reasoning: Optional[str] = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")


def parse_arguments(text: Union[str, Mapping[str, Any]], *, param: str) -> dict[str, Any]:
    """A call's arguments from history (a JSON object text, as OpenAI clients send them).
    Raises InvalidRequest naming `param` when they are not a JSON object."""
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        raise InvalidRequest("must be a JSON object text", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest("must be a JSON object", param=param)
    return value


# -- the model's own template


def template_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as the dicts chat templates read."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": dict(c.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.role == "tool":
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
        if m.reasoning:
            d["reasoning_content"] = m.reasoning
            d["thinking"] = m.reasoning
        out.append(d)
    return out


def _apply(
    tokenizer: Any,
    dicts: list[dict[str, Any]],
    tools: Optional[list[dict[str, Any]]],
    kwargs: Mapping[str, Any],
    add_generation_prompt: bool,
    continue_final: bool = False,
) -> str:
    extra = dict(kwargs)
    if tools:
        extra["tools"] = tools
    if continue_final:  # the last (assistant) message is left open, to be continued
        extra["continue_final_message"] = True
        add_generation_prompt = False
    text = tokenizer.apply_chat_template(
        dicts, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
    if not isinstance(text, str):  # some tokenizers answer a list for a batch of one
        text = text[0]
    return str(text)


_supports: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_PROBE_TOOL = ToolSpec(
    "probe_function_x7",
    "A probe.",
    {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
).openai()


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders tools: the prompt with a probe tool must differ from
    the one without it (and name it). Cached per tokenizer."""
    try:
        return _supports[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = [{"role": "user", "content": "hi"}]
    try:
        without = _apply(tokenizer, probe, None, {}, True)
        with_tools = _apply(tokenizer, probe, [_PROBE_TOOL], {}, True)
        result = with_tools != without and "probe_function_x7" in with_tools
    except Exception:  # a template that fails with tools does not support them
        result = False
    try:
        _supports[tokenizer] = result
    except TypeError:  # not weak-referenceable: no cache
        pass
    return result


# -- the fallback for templates without tools

FALLBACK_INSTRUCTIONS = """\
# Tools

You can call functions to help answer the user. These are the functions available, one JSON \
object per line (name, description and the JSON Schema of its parameters):
<tools>
{tools}
</tools>

To call a function, answer with a JSON object holding its name and its arguments inside \
<tool_call></tool_call> tags, and nothing else:
<tool_call>
{{"name": "function_name", "arguments": {{"argument": "value"}}}}
</tool_call>
You may make several calls, one <tool_call> block each. The results come back inside \
<tool_response></tool_response> tags. If no function is needed, answer normally."""

_CHOICE = {
    "required": "\nYou must call at least one function now.",
}


def fallback_system_prompt(tools: Sequence[ToolSpec], tool_choice: ToolChoice = "auto") -> str:
    """The system-prompt section that gives tools to a model whose template has none."""
    lines = "\n".join(
        json.dumps(
            {"name": t.name, "description": t.description, "parameters": dict(t.parameters)},
            ensure_ascii=False,
        )
        for t in tools
    )
    text = FALLBACK_INSTRUCTIONS.format(tools=lines)
    if tool_choice in _CHOICE:
        text += _CHOICE[tool_choice]
    elif tool_choice not in ("auto", "none"):
        text += f"\nYou must call the function {tool_choice} now."
    return text


def _call_block(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": dict(call.arguments)}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def fallback_messages(
    messages: Sequence[Message], tools: Sequence[ToolSpec], tool_choice: ToolChoice = "auto"
) -> list[dict[str, Any]]:
    """The conversation rewritten for a template without tools (see the module docstring)."""
    section = fallback_system_prompt(tools, tool_choice) if tools else ""
    out: list[dict[str, Any]] = []
    if section and (not messages or messages[0].role != "system"):
        out.append({"role": "system", "content": section})
        section = ""
    for m in messages:
        if m.role == "system":
            content = m.content
            if section:
                content = f"{content}\n\n{section}" if content else section
                section = ""
            out.append({"role": "system", "content": content})
        elif m.role == "assistant":
            parts = [m.content] if m.content else []
            parts += [_call_block(c) for c in m.tool_calls]
            d: dict[str, Any] = {"role": "assistant", "content": "\n".join(parts)}
            if m.reasoning:
                d["reasoning_content"] = m.reasoning
            out.append(d)
        elif m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            prev = out[-1] if out else None
            if prev is not None and prev.get("_tool_results"):
                prev["content"] += "\n" + block  # results of one turn's calls: one user turn
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({"role": m.role, "content": m.content})
    for d in out:
        d.pop("_tool_results", None)
    return out


# -- rendering


def render_text(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    tools: Sequence[ToolSpec] = (),
    tool_choice: ToolChoice = "auto",
    template_kwargs: Optional[Mapping[str, Any]] = None,
    add_generation_prompt: bool = True,
    continue_final: bool = False,
) -> str:
    """The prompt text: the model's chat template with `tools`, or the fallback (module
    docstring) when the template renders none. `continue_final`: the last message is an
    assistant turn left open (a prefill the answer continues)."""
    kwargs = dict(template_kwargs or {})
    offered = list(tools) if tool_choice != "none" else []
    has_history = any(m.tool_calls or m.role == "tool" for m in messages)
    if (offered or has_history) and not template_supports_tools(tokenizer):
        dicts = fallback_messages(messages, offered, tool_choice)
        return _apply(tokenizer, dicts, None, kwargs, add_generation_prompt, continue_final)
    dicts = template_dicts(messages)
    tools_ = [t.openai() for t in offered]
    return _apply(tokenizer, dicts, tools_, kwargs, add_generation_prompt, continue_final)


def render(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    tools: Sequence[ToolSpec] = (),
    tool_choice: ToolChoice = "auto",
    template_kwargs: Optional[Mapping[str, Any]] = None,
    add_generation_prompt: bool = True,
    continue_final: bool = False,
) -> list[int]:
    """The prompt's token ids (the template's text, tokenized without added special tokens,
    as `apply_chat_template(tokenize=True)` does)."""
    text = render_text(
        tokenizer,
        messages,
        tools=tools,
        tool_choice=tool_choice,
        template_kwargs=template_kwargs,
        add_generation_prompt=add_generation_prompt,
        continue_final=continue_final,
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def with_format_instruction(
    messages: Sequence[Message], schema: Optional[Mapping[str, Any]]
) -> tuple[Message, ...]:
    """The conversation with a system line asking for JSON (following `schema`, when given).

    The grammar makes the answer valid whatever the model intends, but a model that knows the
    fields it is asked for fills them with sense and ends them, where one that doesn't may loop
    inside a string until max_tokens (seen with SmolLM2-135M)."""
    if schema is None:
        line = "Respond with a JSON object."
    else:
        line = "Respond with a JSON object that follows this JSON Schema: " + json.dumps(
            schema, ensure_ascii=False, separators=(",", ":")
        )
    msgs = list(messages)
    if msgs and msgs[0].role == "system":
        first = msgs[0]
        msgs[0] = Message(
            "system", f"{first.content}\n\n{line}" if first.content else line, name=first.name
        )
    else:
        msgs.insert(0, Message("system", line))
    return tuple(msgs)
