"""The streaming output parser on outputs written from each format's documentation, fed whole,
character by character and in random chunks (the merged events must not change)."""

from __future__ import annotations

import json

import pytest

from appliance.engine.output import (
    GLM,
    HERMES,
    LLAMA3,
    MISTRAL,
    QWEN3_CODER,
    Family,
    OutputParser,
    ReasoningMode,
    Text,
    ToolCallArgs,
    ToolCallStart,
    ToolSpec,
)

from ._output_util import calls_only, counter_ids, feed, parse_all, text_of

WEATHER = ToolSpec(
    "get_weather",
    "Current weather in a city.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
            "ratio": {"type": "number"},
            "options": {"type": "object"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["city"],
    },
)
TIME = ToolSpec(
    "get_time", "The time in a zone.", {"type": "object", "properties": {"tz": {"type": "string"}}}
)
TOOLS = [WEATHER, TIME]
THINK = ReasoningMode()
THINK_OPEN = ReasoningMode(started=True)


# -- hermes / Qwen2.5: <tool_call>{json}</tool_call>


def test_hermes_text_then_call() -> None:
    out = parse_all(
        HERMES,
        'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}\n</tool_call>',
    )
    assert out == [("text", "I will check."), ("call", "get_weather", {"city": "Paris", "days": 2})]


def test_hermes_two_parallel_calls_and_text_after() -> None:
    out = parse_all(
        HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>\n\n'
        "Both asked.",
    )
    assert out == [
        ("call", "get_weather", {"city": "Paris"}),
        ("call", "get_time", {"tz": "CET"}),
        ("text", "Both asked."),
    ]


@pytest.mark.parametrize(
    "body",
    [
        '{"name":"get_weather","arguments":{"city":"Paris","tags":["a","b"]}}',
        '\n  {\n    "name": "get_weather",\n    "arguments": {\n      "city": "Paris",\n'
        '      "tags": ["a", "b"]\n    }\n  }\n',
        '{"arguments": {"city": "Paris", "tags": ["a", "b"]}, "name": "get_weather"}',
        '{"name": "get_weather", "id": 7, '
        '"arguments": "{\\"city\\": \\"Paris\\", \\"tags\\": [\\"a\\", \\"b\\"]}"}',
        '[{"name": "get_weather", "arguments": {"city": "Paris", "tags": ["a", "b"]}}]',
    ],
)
def test_hermes_body_variants(body: str) -> None:
    out = parse_all(HERMES, f"<tool_call>{body}</tool_call>")
    assert out == [("call", "get_weather", {"city": "Paris", "tags": ["a", "b"]})]


def test_hermes_arguments_stream_before_the_call_ends() -> None:
    p = OutputParser(HERMES, tools_enabled=True, reasoning=None, id_factory=counter_ids())
    events = p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert isinstance(events[0], ToolCallStart) and events[0].name == "get_weather"
    sent = "".join(e.delta for e in events if isinstance(e, ToolCallArgs))
    assert sent == '{"city": "Par'
    # A comma is held until what follows it is known.
    events = p.feed('is", ')
    assert "".join(e.delta for e in events if isinstance(e, ToolCallArgs)) == 'is"'


def test_hermes_raw_newline_in_a_string_is_escaped() -> None:
    out = parse_all(
        HERMES, '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa\nris"}}</tool_call>'
    )
    assert out == [("call", "get_weather", {"city": "Pa\nris"})]


def test_hermes_cut_off_mid_arguments_is_completed() -> None:
    out = parse_all(
        HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', tools=TOOLS
    )
    assert out == [("call", "get_weather", {"city": "Par"})]
    out = parse_all(
        HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "tags": ["a", '
    )
    assert out == [("call", "get_weather", {"city": "Paris", "tags": ["a"]})]
    out = parse_all(HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"days": 1')
    assert out == [("call", "get_weather", {"days": 1})]


def test_hermes_cut_off_before_the_name_is_text() -> None:
    assert parse_all(HERMES, 'Sure.\n<tool_call>\n{"na') == [("text", 'Sure.\n<tool_call>\n{"na')]
    assert parse_all(HERMES, "Sure. <tool_") == [("text", "Sure. <tool_")]


def test_hermes_unparseable_call_is_text() -> None:
    raw = '<tool_call>\nget_weather(city="Paris")\n</tool_call>'
    out = parse_all(HERMES, "Calling: " + raw + " done")
    assert calls_only(out) == []
    assert text_of(out) == "Calling: " + raw + " done"
    raw = '<tool_call>{"name": get_weather}</tool_call>'
    assert parse_all(HERMES, raw) == [("text", raw)]


def test_hermes_invalid_json_after_start_ends_the_call_and_keeps_the_rest() -> None:
    out = parse_all(
        HERMES, '<tool_call>{"name": "get_weather", "arguments": {"city": Paris}}</tool_call>\nok'
    )
    assert out[0] == ("call", "get_weather", {"city": None})
    assert text_of(out) == "Paris}}\nok"


def test_markup_like_prose_is_text() -> None:
    prose = "Use <tool> or <tool_call without closing, and a < b > c. [TOOL] <think-ish>"
    assert parse_all(HERMES, prose) == [("text", prose)]
    assert parse_all(MISTRAL, prose) == [("text", prose)]
    assert parse_all(QWEN3_CODER, prose, reasoning=THINK) == [("text", prose)]


def test_tools_disabled_leaves_markup_in_the_text() -> None:
    raw = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert parse_all(HERMES, raw, tools_enabled=False) == [("text", raw)]


def test_empty_block_and_name_only() -> None:
    assert parse_all(HERMES, "<tool_call></tool_call>Hi") == [("text", "Hi")]
    out = parse_all(HERMES, '<tool_call>{"name": "get_time"}</tool_call>')
    assert out == [("call", "get_time", {})]


# -- thinking


def test_thinking_before_a_call() -> None:
    out = parse_all(
        HERMES,
        "<think>\nThe user wants weather. <tool_call> here is not a call.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
        reasoning=THINK,
    )
    assert out == [
        ("reasoning", "The user wants weather. <tool_call> here is not a call."),
        ("call", "get_weather", {"city": "Oslo"}),
    ]


def test_thinking_opened_by_the_prompt() -> None:
    out = parse_all(QWEN3_CODER, "Let me think.\n</think>\n\nParis is sunny.", reasoning=THINK_OPEN)
    assert out == [("reasoning", "Let me think."), ("text", "Paris is sunny.")]
    # A model that opens thinking again anyway.
    out = parse_all(HERMES, "<think>\nHmm.</think>Yes.", reasoning=THINK_OPEN)
    assert out == [("reasoning", "Hmm."), ("text", "Yes.")]


def test_thinking_cut_off_and_stray_end() -> None:
    assert parse_all(HERMES, "Still thinking <tool", reasoning=THINK_OPEN) == [
        ("reasoning", "Still thinking <tool")
    ]
    assert parse_all(HERMES, "Answer</think> more", reasoning=THINK) == [("text", "Answer more")]


def test_thinking_is_split_even_without_tools() -> None:
    out = parse_all(None, "<think>a</think>b", reasoning=THINK, tools_enabled=False)
    assert out == [("reasoning", "a"), ("text", "b")]


# -- qwen3_coder XML

QWEN3_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n"
    '<parameter=options>\n{"detail": "high"}\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n'
    "</function>\n</tool_call>"
)


def test_qwen3_coder_values_typed_by_schema() -> None:
    out = parse_all(QWEN3_CODER, "Checking.\n" + QWEN3_CALL, tools=TOOLS)
    assert out == [
        ("text", "Checking."),
        (
            "call",
            "get_weather",
            {
                "city": "Paris",
                "days": 3,
                "metric": True,
                "options": {"detail": "high"},
                "ratio": 0.5,
            },
        ),
    ]


def test_qwen3_coder_multiline_string_and_unknown_parameter() -> None:
    code = 'def f(x):\n    return "<b>" + x\n'
    text = (
        f"<tool_call>\n<function=run>\n<parameter=code>\n{code}\n</parameter>\n"
        "<parameter=n>\n7\n</parameter>\n</function>\n</tool_call>"
    )
    # run is not among the tools: every value is a string, as mlx-lm's parser has it.
    assert parse_all(QWEN3_CODER, text, tools=TOOLS) == [("call", "run", {"code": code, "n": "7"})]


def test_qwen3_coder_parallel_missing_end_tags_and_cut() -> None:
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_time>\n<parameter=tz>\nCET\n</parameter>\n</function>\n"
        "</tool_call>"
    )
    out = parse_all(QWEN3_CODER, text, tools=TOOLS)
    assert calls_only(out) == [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "CET"})]
    cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    assert parse_all(QWEN3_CODER, cut, tools=TOOLS) == [("call", "get_weather", {"city": "Par"})]
    cut = "<tool_call>\n<function=get_weather>\n<parameter=days>\n1"
    assert parse_all(QWEN3_CODER, cut, tools=TOOLS) == [("call", "get_weather", {"days": 1})]
    cut = "<tool_call>\n<function=get_wea"
    assert parse_all(QWEN3_CODER, cut, tools=TOOLS) == [("text", cut)]


def test_qwen3_coder_streams_string_values() -> None:
    p = OutputParser(QWEN3_CODER, tools_enabled=True, reasoning=None, tools=TOOLS)
    ev = p.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Fran")
    assert "".join(e.delta for e in ev if isinstance(e, ToolCallArgs)) == '{"city": "San Fran'


# -- GLM 4.5 / 4.7


@pytest.mark.parametrize(
    "call",
    [
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>tags</arg_key>\n"
        '<arg_value>["a", "b"]</arg_value>\n</tool_call>',
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value>"
        "<arg_key>days</arg_key><arg_value>3</arg_value>"
        '<arg_key>tags</arg_key><arg_value>["a", "b"]'
        "</arg_value></tool_call>",
        '<tool_call>get_weather\n{"city": "Beijing", "days": 3, "tags": ["a", "b"]}\n</tool_call>',
    ],
)
def test_glm_forms(call: str) -> None:
    out = parse_all(GLM, "Let me look.\n" + call + "\nDone.", tools=TOOLS)
    assert out == [
        ("text", "Let me look."),
        ("call", "get_weather", {"city": "Beijing", "days": 3, "tags": ["a", "b"]}),
        ("text", "Done."),
    ]


def test_glm_no_arguments_and_cut() -> None:
    assert parse_all(GLM, "<tool_call>get_time\n</tool_call>") == [("call", "get_time", {})]
    cut = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Bei"
    assert parse_all(GLM, cut, tools=TOOLS) == [("call", "get_weather", {"city": "Bei"})]
    assert parse_all(GLM, "<tool_call>get_wea") == [("text", "<tool_call>get_wea")]


# -- Llama 3.x JSON


def test_llama_bare_json_answer_is_a_call() -> None:
    out = parse_all(LLAMA3, '{"name": "get_weather", "parameters": {"city": "Lima"}}')
    assert out == [("call", "get_weather", {"city": "Lima"})]
    out = parse_all(
        LLAMA3,
        '\n{"type": "function", "name": "get_weather", "parameters": {"city": "Lima"}}; '
        '{"name": "get_time", "parameters": {}}',
    )
    assert calls_only(out) == [("get_weather", {"city": "Lima"}), ("get_time", {})]


def test_llama_python_tag_and_thinking() -> None:
    out = parse_all(
        LLAMA3,
        'Let me check.<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}<|eom_id|>',
    )
    assert out == [("text", "Let me check."), ("call", "get_time", {"tz": "UTC"})]


def test_llama_json_that_is_not_a_call_is_text() -> None:
    for answer in ['{"answer": 42}', "The answer is {not json}.", '{"name": 5}', "{"]:
        assert parse_all(LLAMA3, answer) == [("text", answer)], answer


# -- Mistral


def test_mistral_json_list() -> None:
    out = parse_all(
        MISTRAL,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Nice"}}, '
        '{"name": "get_time", "arguments": {"tz": "CET"}}]',
    )
    assert calls_only(out) == [("get_weather", {"city": "Nice"}), ("get_time", {"tz": "CET"})]


@pytest.mark.parametrize(
    "text",
    [
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}',
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}get_time[ARGS]{"tz": "CET"}',
        '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Nice"} '
        '[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}',
    ],
)
def test_mistral_header_forms(text: str) -> None:
    out = parse_all(MISTRAL, "Sure." + text + " Anything else?")
    assert out == [
        ("text", "Sure."),
        ("call", "get_weather", {"city": "Nice"}),
        ("call", "get_time", {"tz": "CET"}),
        ("text", "Anything else?"),
    ]


def test_mistral_cut_and_broken() -> None:
    assert parse_all(MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Ni') == [
        ("call", "get_weather", {"city": "Ni"})
    ]
    assert parse_all(MISTRAL, "[TOOL_CALLS]get weather") == [("text", "[TOOL_CALLS]get weather")]


# -- another mlx-lm format, parsed whole by mlx-lm


def test_generic_mlx_lm_family() -> None:
    fam = Family("mlx_lm:pythonic", mlx_parser="pythonic")
    out = parse_all(
        fam, 'Ok.<|tool_call_start|>[get_weather(city="Paris", days=2)]<|tool_call_end|>Bye'
    )
    assert out == [
        ("text", "Ok."),
        ("call", "get_weather", {"city": "Paris", "days": 2}),
        ("text", "Bye"),
    ]
    broken = "<|tool_call_start|>not python((<|tool_call_end|>"
    assert parse_all(fam, broken) == [("text", broken)]


# -- against mlx-lm's own (whole-text) parsers


def _mlx(module: str, body: str, tools: list[ToolSpec]) -> list[tuple[str, dict]]:
    import importlib

    mod = importlib.import_module(f"mlx_lm.tool_parsers.{module}")
    got = mod.parse_tool_call(body, [t.openai() for t in tools])
    got = got if isinstance(got, list) else [got]
    return [(c["name"], c["arguments"]) for c in got]


def test_agrees_with_mlx_lm_parsers() -> None:
    body = QWEN3_CALL[len("<tool_call>") : -len("</tool_call>")]
    assert calls_only(parse_all(QWEN3_CODER, QWEN3_CALL, tools=TOOLS)) == _mlx(
        "qwen3_coder", body, TOOLS
    )
    glm = (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
    )
    assert calls_only(parse_all(GLM, glm, tools=TOOLS)) == _mlx(
        "glm47", glm[len("<tool_call>") : -len("</tool_call>")], TOOLS
    )
    hermes = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
    assert calls_only(parse_all(HERMES, f"<tool_call>{hermes}</tool_call>")) == [
        (lambda d: (d["name"], d["arguments"]))(_json(hermes))
    ]
    mistral = 'get_weather[ARGS]{"city": "Nice"}get_time[ARGS]{"tz": "CET"}'
    assert calls_only(parse_all(MISTRAL, "[TOOL_CALLS]" + mistral)) == _mlx(
        "mistral", mistral, TOOLS
    )


def _json(s: str) -> dict:
    return json.loads(s)


# -- the parser as a whole


def test_ids_come_from_the_factory_and_close_is_final() -> None:
    ids = iter(["toolu_1", "toolu_2"])
    p = OutputParser(HERMES, tools_enabled=True, reasoning=None, id_factory=lambda: next(ids))
    events = feed(
        p,
        [
            '<tool_call>{"name": "a", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>',
        ],
    )
    assert [e.id for e in events if isinstance(e, ToolCallStart)] == ["toolu_1", "toolu_2"]
    assert p.calls == 2
    assert p.close() == [] and p.feed("more") == []


def test_default_ids_are_call_prefixed_and_distinct() -> None:
    p = OutputParser(HERMES, tools_enabled=True, reasoning=None)
    events = feed(p, ['<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b"}</tool_call>'])
    ids = [e.id for e in events if isinstance(e, ToolCallStart)]
    assert len(set(ids)) == 2 and all(i.startswith("call_") and len(i) == 29 for i in ids)


def test_plain_text_streams_without_delay() -> None:
    p = OutputParser(HERMES, tools_enabled=True, reasoning=None)
    assert p.feed("Hello") == [Text("Hello")]
    assert p.feed(" world") == [Text(" world")]
    assert p.feed("\n") == []  # whitespace waits: a call may follow
    assert p.close() == [Text("\n")]


def test_random_markup_never_crashes_and_agrees_across_chunkings() -> None:
    import random

    rng = random.Random(7)
    alphabet = [
        "<tool_call>",
        "</tool_call>",
        "{",
        "}",
        '"',
        ":",
        ",",
        "name",
        "arguments",
        "[TOOL_CALLS]",
        "[ARGS]",
        "<think>",
        "</think>",
        "<function=",
        ">",
        "a",
        " ",
        "\n",
        "<parameter=",
        "</parameter>",
        "<arg_key>",
        "<arg_value>",
        "\\",
        "[",
        "]",
    ]
    for fam in (HERMES, QWEN3_CODER, GLM, LLAMA3, MISTRAL):
        for _ in range(150):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            parse_all(fam, text, tools=TOOLS, reasoning=THINK, seed=rng.randint(0, 99))


PREFIX_SAMPLES = [
    (
        HERMES,
        'Hi.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris", "tags": '
        '["a", 1.5e3, true, null, {"x": []}]}}\n</tool_call>\nok',
    ),
    (QWEN3_CODER, "<think>x</think>" + QWEN3_CALL + "\nbye"),
    (
        GLM,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
    ),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Lima", "days": -12}}; {"name": "x"}'),
    (MISTRAL, '[TOOL_CALLS]get_weather[CALL_ID]a1[ARGS]{"city": "Nice"}get_time[ARGS]{"tz": "C"}'),
]


@pytest.mark.parametrize("family,text", PREFIX_SAMPLES, ids=[f.name for f, _ in PREFIX_SAMPLES])
def test_every_cut_and_many_typos_still_parse(family: Family, text: str) -> None:
    # Every prefix (a cut at any point) and single-character damage: never an exception,
    # every call well formed, the same events whatever the chunking.
    import random

    rng = random.Random(family.name)
    variants = [text[:i] for i in range(len(text) + 1)]
    for _ in range(60):
        i = rng.randrange(len(text))
        variants.append(text[:i] + rng.choice('{}[]",:\\ a<>\n') + text[i + 1 :])
        variants.append(text[:i] + text[i + 1 :])
    for v in variants:
        parse_all(family, v, tools=TOOLS, reasoning=THINK, seed=rng.randint(0, 99))


def test_pieces_from_mlx_lm_detokenizer() -> None:
    # The pieces the engine feeds: mlx-lm's streaming detokenizer over a tokenizer that has
    # the Qwen markers as added tokens (multi-byte characters arrive whole).
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

    from ._output_util import hf_tokenizer

    hf = hf_tokenizer(added=["<tool_call>", "</tool_call>", "<think>", "</think>"])
    detok = TokenizerWrapper(hf, BPEStreamingDetokenizer).detokenizer
    text = (
        "<think>\nShould call.\n</think>\n\nOk.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
    )
    detok.reset()
    pieces = []
    for t in hf.encode(text, add_special_tokens=False):
        detok.add_token(t)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "<tool_call>" in pieces
    p = OutputParser(HERMES, tools_enabled=True, reasoning=THINK)
    from ._output_util import summary

    assert summary(feed(p, pieces)) == [
        ("reasoning", "Should call."),
        ("text", "Ok."),
        ("call", "get_weather", {"city": "Zürich"}),
    ]
