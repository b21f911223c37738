"""Lark grammars (llguidance's dialect) that produce exactly a family's tool-call syntax.

    text = grammar(family, tools, parallel=False, force=None, special=special_tokens(tok))

The grammar covers the calls only, for `tool_choice` "required" or a named function: one call,
or one or more when `parallel`; names are the tools' names (or only `force`), and arguments
follow each tool's parameters schema through inline `%json` (compact: no free whitespace, at
most one space after `,` and `:`). With a `reasoning` mode the model may think first (it must
when the prompt opened thinking); harmony always allows an analysis message first.

Markers that are single added tokens of the model (`<tool_call>` in Qwen, `[TOOL_CALLS]` in
Mistral, harmony's `<|channel|>`...) must be produced as those tokens, which llguidance only
allows through its `<[id]>` syntax: `special` maps such marker texts to their ids
(`special_tokens(tokenizer)` gives them). A marker not in `special` is plain text, as with the
fallback prompt on a model without those tokens.

Every family here can be expressed. Limits: XML-style values (qwen3_coder, glm) that are
strings are free text up to the closing tag (an enum of strings is one of its values; minLength
and maxLength are kept, pattern and format are not); other values are JSON under `%json` of the
parameter's schema. Parameters come in the schema's order (required ones always, others
optional). The model's own choice between text and a call ("auto") needs no grammar.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

from .families import GLM, HARMONY, HERMES, LLAMA3, MISTRAL, QWEN3_CODER, Family, ReasoningMode
from .prompt import ToolSpec

__all__ = ["JSON_OPTIONS", "grammar", "special_tokens", "with_thinking"]

JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ?",
    "key_separator": ": ?",
}


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """Marker texts that are single added tokens of `tokenizer`, with their ids."""
    try:
        added = tokenizer.get_added_vocab()
    except Exception:  # no added vocabulary view: every marker is text
        return {}
    return {str(k): int(v) for k, v in added.items()}


class _G:
    """A grammar under construction: rules, and literals that may be special tokens."""

    def __init__(self, special: Mapping[str, int]) -> None:
        self.special = special
        self.rules: list[str] = []
        self.n = 0

    def lit(self, text: str) -> str:
        """`text` as a grammar item: special tokens by id, the rest as string literals."""
        parts: list[str] = []
        rest = text
        while rest:
            at, tok = len(rest), ""
            for s in self.special:
                i = rest.find(s) if s else -1
                if i != -1 and (i < at or (i == at and len(s) > len(tok))):
                    at, tok = i, s
            if at:
                parts.append(json.dumps(rest[:at]))
            if tok:
                parts.append(f"<[{self.special[tok]}]>")
                rest = rest[at + len(tok) :]
            else:
                rest = ""
        return " ".join(parts) if parts else '""'

    def rule(self, body: str, *, lazy: bool = False, max_tokens: Optional[int] = None) -> str:
        self.n += 1
        name = f"r{self.n}"
        attrs = [a for a in ("lazy" if lazy else "",) if a]
        if max_tokens is not None:
            attrs.append(f"max_tokens={max_tokens}")
        self.rules.append(f"{name}{'[' + ', '.join(attrs) + ']' if attrs else ''}: {body}")
        return name

    def until(self, marker: str, repeat: str = "*", *, max_tokens: Optional[int] = None) -> str:
        """Text (`repeat`: how many characters, a regex quantifier), then `marker`; the text
        ends at the marker's first occurrence. `max_tokens` (a marker that is one special token
        only): after that many tokens of text the marker is forced."""
        if marker in self.special:
            text = f"/(.|\\n){repeat}/"
            if max_tokens is not None:
                text = self.rule(text, max_tokens=max_tokens)
            return f"{text} <[{self.special[marker]}]>"
        return self.rule(f"/(.|\\n){repeat}" + _regex_escape(marker) + "/", lazy=True)

    def thinking(self, reasoning: ReasoningMode, body: str, budget: Optional[int] = None) -> str:
        """`body` after the model's thinking: required when the prompt opened it, optional
        otherwise; `budget` caps its tokens where the end marker is one special token."""
        think = self.lit(reasoning.start) + " " if not reasoning.started else ""
        text = self.until(reasoning.end, max_tokens=budget)
        block = self.rule(f'{think}{text} ("\\n" | "\\n\\n")?')
        return f"{block} {body}" if reasoning.started else f"{block}? {body}"

    def json(self, schema: Mapping[str, Any]) -> str:
        doc = dict(schema)
        doc["x-guidance"] = dict(JSON_OPTIONS)
        return self.rule("%json " + json.dumps(doc, ensure_ascii=False))

    def text(self, start: str) -> str:
        return f"start: {start}\n" + "\n".join(self.rules) + "\n"


def _regex_escape(s: str) -> str:
    out = []
    for ch in s:
        if ch.isalnum() or ch == " ":
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        else:
            out.append("\\" + ch if ch in "\\^$.|?*+()[]{}/-" else ch)
    return "".join(out)


def _params(tool: ToolSpec) -> dict[str, Any]:
    p = dict(tool.parameters) if tool.parameters else {}
    p.setdefault("type", "object")
    if p.get("type") == "object" and "properties" not in p:
        p["properties"] = {}
    return p


def _chosen(tools: Sequence[ToolSpec], force: Optional[str]) -> list[ToolSpec]:
    if force is None:
        chosen = list(tools)
    else:
        chosen = [t for t in tools if t.name == force]
        if not chosen:
            raise ValueError(f"no tool named {force!r}")
    if not chosen:
        raise ValueError("a tool-call grammar needs at least one tool")
    return chosen


def _call_schema(tools: Sequence[ToolSpec], name_key: str, args_key: str) -> dict[str, Any]:
    alts = [
        {
            "type": "object",
            "properties": {name_key: {"const": t.name}, args_key: _params(t)},
            "required": [name_key, args_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def grammar(
    family: Family,
    tools: Sequence[ToolSpec],
    *,
    parallel: bool = False,
    force: Optional[str] = None,
    special: Optional[Mapping[str, int]] = None,
    reasoning: Optional[ReasoningMode] = None,
    budget: Optional[int] = None,
) -> str:
    """The Lark grammar of `family`'s tool calls (see the module docstring); `budget` caps the
    thinking before them (see `thinking_budget`). Raises
    ValueError when `force` names no tool, or for a family whose syntax is not known here."""
    chosen = _chosen(tools, force)
    g = _G(special or {})
    if family == HARMONY:
        return _harmony(g, chosen)
    sep: Optional[str]
    if family in (HERMES, QWEN3_CODER, GLM):
        one = {HERMES: _hermes, QWEN3_CODER: _qwen3_coder, GLM: _glm}[family](g, chosen)
        sep = '"\\n"'
    elif family == LLAMA3:
        one = g.json(_call_schema(chosen, "name", "parameters"))
        sep = '"; "'
    elif family == MISTRAL:
        one, sep = _mistral(g, chosen, parallel)
    else:
        raise ValueError(f"no grammar for the {family.name} tool-call format")
    if parallel and sep is not None:
        calls = f"{one} ({sep} {one})*" if sep else f"{one}+"
    else:
        calls = one
    if reasoning is not None:
        calls = g.thinking(reasoning, calls, budget)
    return g.text(calls)


def with_thinking(
    body: str,
    *,
    reasoning: ReasoningMode,
    special: Optional[Mapping[str, int]] = None,
    budget: Optional[int] = None,
) -> str:
    """A Lark grammar of `body` (a grammar item such as `%json {...}`) after the model's
    thinking: required when the prompt opened it, optional otherwise; `budget`: see
    `thinking_budget`."""
    g = _G(special or {})
    return g.text(g.thinking(reasoning, g.rule(body), budget))


def budget_enforceable(reasoning: ReasoningMode, special: Mapping[str, int]) -> bool:
    """Whether a thinking budget can be enforced: the end marker is one special token (text
    markers could be split over tokens the budget would cut)."""
    return reasoning.end in special


def thinking_budget(
    *, reasoning: ReasoningMode, budget: int, special: Mapping[str, int]
) -> Optional[str]:
    """A Lark grammar of a free answer whose thinking takes at most `budget` tokens, after
    which its end marker is forced; None where that can't be enforced."""
    if not budget_enforceable(reasoning, special):
        return None
    g = _G(special)
    return g.text(g.thinking(reasoning, g.rule("/(.|\\n)*/"), budget))


def _hermes(g: _G, tools: Sequence[ToolSpec]) -> str:
    body = g.json(_call_schema(tools, "name", "arguments"))
    return g.rule(f'{g.lit("<tool_call>")} "\\n" {body} "\\n" {g.lit("</tool_call>")}')


def _string_value(g: _G, end: str, spec: Mapping[str, Any]) -> str:
    lo, hi = spec.get("minLength"), spec.get("maxLength")
    if isinstance(hi, int) or isinstance(lo, int):
        rng = f"{{{lo if isinstance(lo, int) else 0},{hi if isinstance(hi, int) else ''}}}"
        return g.until(end, rng)
    return g.until(end)


def _typed_value(g: _G, spec: Mapping[str, Any], end: str) -> str:
    """A value of an XML-style parameter, then `end`."""
    t = spec.get("type") if isinstance(spec, Mapping) else None
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    enum = spec.get("enum") if isinstance(spec, Mapping) else None
    close = g.lit(end)
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return "(" + " | ".join(json.dumps(v) for v in enum) + f") {close}"
    if t == "string" or t is None:
        return _string_value(g, end, spec if isinstance(spec, Mapping) else {})
    # Numbers, booleans, null, objects and arrays are written as JSON: the schema applies
    # whole (bounds included).
    return f"{g.json(spec)} {close}"


def _props(tool: ToolSpec) -> list[tuple[str, Mapping[str, Any], bool]]:
    p = _params(tool)
    props = p.get("properties") or {}
    required = set(p.get("required") or ())
    return [(k, v if isinstance(v, Mapping) else {}, k in required) for k, v in props.items()]


def _qwen3_coder(g: _G, tools: Sequence[ToolSpec]) -> str:
    alts = []
    for t in tools:
        items = []
        for key, spec, req in _props(t):
            value = _typed_value(g, spec, "\n</parameter>\n")
            p = g.rule(f'{g.lit(f"<parameter={key}>")} "\\n" {value}')
            items.append(p if req else f"{p}?")
        head = g.lit(f"<tool_call>\n<function={t.name}>\n")
        tail = g.lit("</function>\n</tool_call>")
        alts.append(g.rule(" ".join([head, *items, tail])))
    return g.rule(" | ".join(alts))


def _glm(g: _G, tools: Sequence[ToolSpec]) -> str:
    alts = []
    for t in tools:
        items = []
        for key, spec, req in _props(t):
            value = _typed_value(g, spec, "</arg_value>")
            p = g.rule(
                f'{g.lit(f"<arg_key>{key}</arg_key>")} "\\n" {g.lit("<arg_value>")} {value} "\\n"'
            )
            items.append(p if req else f"{p}?")
        head = f'{g.lit("<tool_call>")} {json.dumps(t.name)} "\\n"'
        alts.append(g.rule(" ".join([head, *items, g.lit("</tool_call>")])))
    return g.rule(" | ".join(alts))


def _mistral(g: _G, tools: Sequence[ToolSpec], parallel: bool) -> tuple[str, Optional[str]]:
    """One call (and the separator between repeated calls, None when the call is a list)."""
    calls = g.lit("[TOOL_CALLS]")
    if "[ARGS]" in g.special:
        # The newer form: [TOOL_CALLS]NAME[ARGS]{...}, one marker per call.
        alts = [
            g.rule(f"{calls} {json.dumps(t.name)} {g.lit('[ARGS]')} {g.json(_params(t))}")
            for t in tools
        ]
        return g.rule(" | ".join(alts)), ""
    items = _call_schema(tools, "name", "arguments")
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return g.rule(f"{calls} {g.json(schema)}"), None


def _harmony(g: _G, tools: Sequence[ToolSpec]) -> str:
    ch, msg = g.lit("<|channel|>"), g.lit("<|message|>")
    analysis = g.rule(
        f'{ch} "analysis" {msg} {g.until("<|end|>")} {g.lit("<|start|>")} "assistant"'
    )
    alts = [
        g.rule(
            f"{ch} {json.dumps(f'commentary to=functions.{t.name} ')} "
            f'{g.lit("<|constrain|>")} "json" {msg} {g.json(_params(t))} {g.lit("<|call|>")}'
        )
        for t in tools
    ]
    return g.text(f"{analysis}? ({' | '.join(alts)})")
