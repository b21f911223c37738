"""Each family's tool-call grammar: llguidance compiles it against a tokenizer that has the
family's marker tokens, accepts the family's calls (and refuses others), and whatever it lets a
model produce parses back into valid calls."""

from __future__ import annotations

import json
import random
from functools import cache
from typing import Any

import pytest

from appliance.engine.output import (
    GLM,
    HARMONY,
    HERMES,
    LLAMA3,
    MISTRAL,
    QWEN3_CODER,
    Family,
    OutputParser,
    ReasoningMode,
    ToolSpec,
)
from appliance.engine.output.grammar import grammar, special_tokens

from ._output_util import calls_only, feed, hf_tokenizer, summary

pytest.importorskip("llguidance")
import llguidance  # noqa: E402
import llguidance.hf  # noqa: E402

WEATHER = ToolSpec(
    "get_weather",
    "Weather.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "days": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["city"],
        "additionalProperties": False,
    },
)
TIME = ToolSpec(
    "get_time",
    "Time.",
    {
        "type": "object",
        "properties": {
            "unit": {"enum": ["s", "ms"]},
            "utc": {"type": "boolean"},
            "days": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["unit"],
        "additionalProperties": False,
    },
)
TOOLS = [WEATHER, TIME]

MARKERS: dict[str, tuple[list[str], list[str]]] = {
    # family: (special tokens, added non-special tokens) as the real vocabularies have them
    "hermes": ([], ["<tool_call>", "</tool_call>", "<think>", "</think>"]),
    "qwen3_coder": ([], ["<tool_call>", "</tool_call>", "<think>", "</think>"]),
    "glm": (
        [],
        ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"],
    ),
    "llama3": (["<|python_tag|>", "<|eom_id|>"], []),
    "mistral": (["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"], []),
    "mistral_v3": (["[TOOL_CALLS]"], []),
    "harmony": (
        [
            "<|channel|>",
            "<|message|>",
            "<|constrain|>",
            "<|call|>",
            "<|start|>",
            "<|end|>",
            "<|return|>",
        ],
        [],
    ),
    "plain": ([], []),
}


@cache
def _tok(kind: str) -> tuple[Any, Any]:
    special, added = MARKERS[kind]
    hf = hf_tokenizer(special=special, added=added)
    return hf, llguidance.hf.from_tokenizer(hf)


def _matcher(kind: str, text: str) -> Any:
    _, ll = _tok(kind)
    err = llguidance.LLMatcher.validate_grammar(text, ll)
    assert err == "", err
    m = llguidance.LLMatcher(ll, text, log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def _accepts(kind: str, text: str, sample: str) -> bool:
    hf, _ = _tok(kind)
    m = _matcher(kind, text)
    ok = m.consume_tokens(hf.encode(sample, add_special_tokens=False))
    return bool(ok and m.is_accepting())


CASES = [
    (
        HERMES,
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
        "\n</tool_call>",
    ),
    (HERMES, "plain", '<tool_call>\n{"name":"get_time","arguments":{"unit":"ms"}}\n</tool_call>'),
    (
        QWEN3_CODER,
        "qwen3_coder",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
    ),
    (
        GLM,
        "glm",
        "<tool_call>get_time\n<arg_key>unit</arg_key>\n<arg_value>ms</arg_value>\n"
        "<arg_key>utc</arg_key>\n<arg_value>true</arg_value>\n</tool_call>",
    ),
    (LLAMA3, "llama3", '{"name": "get_weather", "parameters": {"city": "Lima"}}'),
    (MISTRAL, "mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Nice", "days": 2}'),
    (MISTRAL, "mistral_v3", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Nice"}}]'),
]


@pytest.mark.parametrize("family,kind,sample", CASES, ids=[c[1] for c in CASES])
def test_grammar_accepts_its_family_and_parses_back(family: Family, kind: str, sample: str) -> None:
    hf, _ = _tok(kind)
    text = grammar(family, TOOLS, special=special_tokens(hf))
    assert _accepts(kind, text, sample)
    p = OutputParser(family, tools_enabled=True, reasoning=None, tools=TOOLS)
    calls = calls_only(summary(feed(p, [sample])))
    assert len(calls) == 1 and calls[0][0] in ("get_weather", "get_time")


@pytest.mark.parametrize("family,kind,sample", CASES, ids=[c[1] for c in CASES])
def test_grammar_refuses_other_names_types_and_text(family: Family, kind: str, sample: str) -> None:
    hf, _ = _tok(kind)
    text = grammar(family, TOOLS, special=special_tokens(hf))
    assert not _accepts(kind, text, "Sure, here is the weather.")
    assert not _accepts(kind, text, sample.replace("get_", "got_"))
    forced = grammar(family, TOOLS, force="get_time", special=special_tokens(hf))
    if "get_weather" in sample:
        assert not _accepts(kind, forced, sample)
    else:
        assert _accepts(kind, forced, sample)
    if '"city": "' in sample:
        assert not _accepts(kind, text, sample.replace('"city": "', '"city": 5, "x": "'))


def test_special_markers_must_be_the_tokens() -> None:
    # With [TOOL_CALLS] a special token, its letters typed one by one are not the marker.
    hf, ll = _tok("mistral")
    text = grammar(MISTRAL, TOOLS, special=special_tokens(hf))
    m = _matcher("mistral", text)
    letters = [t for ch in "[TOOL" for t in hf.encode(ch, add_special_tokens=False)]
    assert m.try_consume_tokens(letters) == 0


def test_parallel_calls() -> None:
    two = {
        "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"unit": "s"}}\n</tool_call>',
        "llama3": '{"name": "get_weather", "parameters": {"city": "A"}}; '
        '{"name": "get_time", "parameters": {"unit": "s"}}',
        "mistral": '[TOOL_CALLS]get_weather[ARGS]{"city": "A"}'
        '[TOOL_CALLS]get_time[ARGS]{"unit": "s"}',
        "mistral_v3": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "A"}}, '
        '{"name": "get_time", "arguments": {"unit": "s"}}]',
    }
    fams = {"hermes": HERMES, "llama3": LLAMA3, "mistral": MISTRAL, "mistral_v3": MISTRAL}
    for kind, sample in two.items():
        hf, _ = _tok(kind)
        single = grammar(fams[kind], TOOLS, special=special_tokens(hf))
        multi = grammar(fams[kind], TOOLS, parallel=True, special=special_tokens(hf))
        assert _accepts(kind, multi, sample), kind
        assert not _accepts(kind, single, sample), kind
        p = OutputParser(fams[kind], tools_enabled=True, reasoning=None, tools=TOOLS)
        assert [c[0] for c in calls_only(summary(feed(p, [sample])))] == ["get_weather", "get_time"]


def test_thinking_before_the_call() -> None:
    hf, _ = _tok("hermes")
    call = '<tool_call>\n{"name": "get_time", "arguments": {"unit": "s"}}\n</tool_call>'
    text = grammar(HERMES, TOOLS, special=special_tokens(hf), reasoning=ReasoningMode())
    assert _accepts("hermes", text, "<think>\nWhich unit? s.\n</think>\n\n" + call)
    assert _accepts("hermes", text, call)
    opened = grammar(
        HERMES, TOOLS, special=special_tokens(hf), reasoning=ReasoningMode(started=True)
    )
    assert _accepts("hermes", opened, "Which unit? s.\n</think>\n\n" + call)
    assert not _accepts("hermes", opened, call)


def test_harmony_grammar() -> None:
    hf, _ = _tok("harmony")
    text = grammar(HARMONY, TOOLS, special=special_tokens(hf))
    call = (
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Oslo"}<|call|>'
    )
    assert _accepts("harmony", text, call)
    assert _accepts(
        "harmony",
        text,
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant" + call,
    )
    assert not _accepts("harmony", text, "<|channel|>final<|message|>Hello<|return|>")


def test_unknown_forced_name_and_unknown_family() -> None:
    with pytest.raises(ValueError):
        grammar(HERMES, TOOLS, force="nope")
    with pytest.raises(ValueError):
        grammar(Family("mlx_lm:pythonic", mlx_parser="pythonic"), TOOLS)


def _walk(kind: str, text: str, rng: random.Random, limit: int = 300) -> list[int]:
    """A random path through what the grammar allows, token by token, to its end."""
    hf, ll = _tok(kind)
    m = _matcher(kind, text)
    eos = hf.convert_tokens_to_ids("<|eot_id|>")
    toks: list[int] = []
    for _ in range(limit):
        if m.is_stopped():
            return toks
        mask = m.compute_bitmask()
        allowed = [i for i in range(len(mask) * 8) if mask[i // 8] >> (i % 8) & 1]
        # Prefer ending once allowed, so walks stay short.
        if eos in allowed and rng.random() < 0.5:
            return toks
        t = rng.choice(allowed)
        if t == eos:
            return toks
        assert m.consume_token(t), m.get_error()
        toks.append(t)
    raise AssertionError("walk did not end: " + hf.decode(toks))


WALK_TOOLS = [TIME]  # no free-text values: every walk ends


@pytest.mark.parametrize(
    "family,kind",
    [
        (HERMES, "hermes"),
        (HERMES, "plain"),
        (QWEN3_CODER, "qwen3_coder"),
        (GLM, "glm"),
        (LLAMA3, "llama3"),
        (MISTRAL, "mistral"),
        (MISTRAL, "mistral_v3"),
    ],
)
def test_whatever_the_grammar_allows_parses_back(family: Family, kind: str) -> None:
    import jsonschema

    hf, _ = _tok(kind)
    text = grammar(family, WALK_TOOLS + [WEATHER], parallel=True, special=special_tokens(hf))
    rng = random.Random(kind)
    schemas = {t.name: t.parameters for t in WALK_TOOLS + [WEATHER]}
    for _ in range(8):
        out = hf.decode(_walk(kind, text, rng), skip_special_tokens=False)
        p = OutputParser(family, tools_enabled=True, reasoning=None, tools=WALK_TOOLS + [WEATHER])
        s = summary(feed(p, [out]))
        assert s and all(item[0] == "call" for item in s), (out, s)
        for _, name, args in s:
            jsonschema.validate(args, schemas[name])
        json.dumps(s)
