"""Prompt rendering: the model's own template with tools, and the fallback prompt for
templates without tools, on the demo model's tokenizer and hand-written family templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.engine.output import (
    HERMES,
    LLAMA3,
    Message,
    OutputParser,
    ToolCall,
    ToolSpec,
    detect_family,
    parse_arguments,
    render,
    render_text,
    template_supports_tools,
)
from appliance.engine.output.prompt import FALLBACK_INSTRUCTIONS, fallback_system_prompt
from appliance.errors import InvalidRequest

from ._output_util import calls_only, feed, hf_tokenizer, summary

WEATHER = ToolSpec(
    "get_weather",
    "Current weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)

CONVERSATION = (
    Message("system", "You are terse."),
    Message("user", "Weather in Paris and Oslo?"),
    Message(
        "assistant",
        "Checking.",
        tool_calls=(
            ToolCall("call_1", "get_weather", {"city": "Paris"}),
            ToolCall("call_2", "get_weather", {"city": "Oslo"}),
        ),
        reasoning="Two cities: two calls.",
    ),
    Message("tool", "18C sunny", tool_call_id="call_1", name="get_weather"),
    Message("tool", "4C snow", tool_call_id="call_2", name="get_weather"),
    Message("assistant", "Paris 18C, Oslo 4C."),
    Message("user", "And Rome?"),
)

# A Qwen2.5-style template: tools in the system turn, calls as <tool_call> JSON blocks, tool
# results as <tool_response> blocks in one user turn.
QWEN_TEMPLATE = r"""
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content }}
{%- else %}{{- 'You are helpful.' }}{%- endif %}
{{- '\n\n# Tools\n\n<tools>' }}
{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\n</tools>\n\nCall a function with:\n<tool_call>\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
{{- tool_call.arguments | tojson }}
{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}
{%- endif %}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

# A Llama 3.1-style template: tools and the JSON answer format in the last user turn, calls as
# bare JSON, results in "ipython" turns.
LLAMA_TEMPLATE = r"""
{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'user' and loop.last and tools %}
{{- '<|start_header_id|>user<|end_header_id|>\n\n' }}
{{- 'Given the following functions, respond with a JSON for a function call. Respond in the ' }}
{{- 'format {"name": function name, "parameters": dictionary of argument name and its value}.\n' }}
{%- for t in tools %}{{- t | tojson }}{{- '\n' }}{%- endfor %}
{{- message.content + '<|eot_id|>' }}
{%- elif message.role == 'assistant' and message.tool_calls %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- for tc in message.tool_calls %}
{%- if not loop.first %}{{- '; ' }}{%- endif %}
{{- '{"name": "' + tc.function.name + '", "parameters": ' }}
{{- tc.function.arguments | tojson }}{{- '}' }}
{%- endfor %}
{{- '<|eot_id|>' }}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' }}
{{- message.content + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def demo_tok():
    from mlx_lm.tokenizer_utils import load

    from appliance.engine.demo import ensure_demo_model

    return load(Path(ensure_demo_model(None)))


def test_demo_template_has_no_tools_so_the_fallback_is_used(demo_tok) -> None:
    assert not template_supports_tools(demo_tok)
    assert detect_family(demo_tok) == HERMES
    text = render_text(demo_tok, CONVERSATION, tools=[WEATHER])
    section = fallback_system_prompt([WEATHER])
    assert f"You are terse.\n\n{section}<|eot_id|>" in text
    assert (
        '{"name": "get_weather", "description": "Current weather in a city.", "parameters": '
        in text
    )
    # Earlier calls as <tool_call> blocks in the assistant text, results in one user turn.
    assert (
        "<|start_header_id|>assistant<|end_header_id|>\n\nChecking.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|eot_id|>'
    ) in text
    assert (
        "<|start_header_id|>user<|end_header_id|>\n\n<tool_response>\n18C sunny\n</tool_response>"
        "\n<tool_response>\n4C snow\n</tool_response><|eot_id|>"
    ) in text
    assert text.endswith("And Rome?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = render(demo_tok, CONVERSATION, tools=[WEATHER])
    assert ids == demo_tok.encode(text, add_special_tokens=False)
    assert ids[0] == demo_tok.convert_tokens_to_ids("<|begin_of_text|>")


def test_fallback_without_a_system_message_and_tool_choice(demo_tok) -> None:
    msgs = (Message("user", "Weather in Rome?"),)
    text = render_text(demo_tok, msgs, tools=[WEATHER], tool_choice="required")
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n# Tools\n"
    )
    assert "You must call at least one function now." in text
    named = render_text(demo_tok, msgs, tools=[WEATHER], tool_choice="get_weather")
    assert "You must call the function get_weather now." in named
    none = render_text(demo_tok, msgs, tools=[WEATHER], tool_choice="none")
    assert "get_weather" not in none and none == render_text(demo_tok, msgs)


def test_fallback_instructions_match_the_hermes_parser(demo_tok) -> None:
    # The example call in the instructions is itself what the hermes parser reads as a call.
    example = FALLBACK_INSTRUCTIONS.split("and nothing else:\n", 1)[1].split("\nYou may", 1)[0]
    p = OutputParser(HERMES, tools_enabled=True, reasoning=None)
    assert calls_only(summary(feed(p, [example.format()]))) == [
        ("function_name", {"argument": "value"})
    ]


def test_assistant_turns_rendered_by_the_fallback_parse_back(demo_tok) -> None:
    # What the fallback writes for an earlier call is what the parser reads as that call.
    text = render_text(demo_tok, CONVERSATION[:3], tools=[WEATHER], add_generation_prompt=False)
    turn = text.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    p = OutputParser(HERMES, tools_enabled=True, reasoning=None)
    assert summary(feed(p, [turn])) == [
        ("text", "Checking."),
        ("call", "get_weather", {"city": "Paris"}),
        ("call", "get_weather", {"city": "Oslo"}),
    ]


def test_qwen_style_template_renders_tools_itself() -> None:
    tok = hf_tokenizer(QWEN_TEMPLATE, added=["<tool_call>", "</tool_call>"])
    assert template_supports_tools(tok)
    assert detect_family(tok) == HERMES
    text = render_text(tok, CONVERSATION, tools=[WEATHER])
    tool_json = json.dumps(WEATHER.openai(), ensure_ascii=False)
    assert text == (
        "<|im_start|>system\nYou are terse.\n\n# Tools\n\n<tools>\n" + tool_json + "\n</tools>\n\n"
        "Call a function with:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C sunny\n</tool_response>\n<tool_response>\n"
        "4C snow\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nParis 18C, Oslo 4C.<|im_end|>\n"
        "<|im_start|>user\nAnd Rome?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = render(tok, CONVERSATION, tools=[WEATHER])
    assert tok.convert_tokens_to_ids("<tool_call>") in ids  # the added token, not its letters
    assert ids == tok.encode(text, add_special_tokens=False)


def test_llama_style_template() -> None:
    tok = hf_tokenizer(LLAMA_TEMPLATE)
    assert template_supports_tools(tok)
    assert detect_family(tok) == LLAMA3
    text = render_text(tok, CONVERSATION, tools=[WEATHER])
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18C sunny<|eot_id|>" in text
    assert text.count('"description": "Current weather in a city."') == 1
    turn = text.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    p = OutputParser(LLAMA3, tools_enabled=True, reasoning=None)
    assert summary(feed(p, [turn])) == [
        ("call", "get_weather", {"city": "Paris"}),
        ("call", "get_weather", {"city": "Oslo"}),
    ]


def test_template_kwargs_reach_the_template() -> None:
    tok = hf_tokenizer("{% if flag %}FLAG{% endif %}{{ messages[0].content }}")
    assert render_text(tok, (Message("user", "x"),), template_kwargs={"flag": True}) == "FLAGx"


def test_message_and_arguments_validation() -> None:
    with pytest.raises(ValueError):
        Message("developer", "x")
    assert parse_arguments('{"a": 1}', param="messages[1].tool_calls[0].function.arguments") == {
        "a": 1
    }
    assert parse_arguments("", param="p") == {}
    for bad in ("[1]", "{oops"):
        with pytest.raises(InvalidRequest) as err:
            parse_arguments(bad, param="messages[1].tool_calls[0].function.arguments")
        assert err.value.param == "messages[1].tool_calls[0].function.arguments"


def test_a_structured_answer_is_asked_for_in_the_system_turn() -> None:
    from appliance.engine.output.prompt import Message, with_format_instruction

    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    alone = with_format_instruction((Message("user", "Where?"),), schema)
    assert [m.role for m in alone] == ["system", "user"]
    assert alone[0].content.endswith('{"type":"object","properties":{"city":{"type":"string"}}}')
    kept = with_format_instruction((Message("system", "Be brief."), Message("user", "Hi")), None)
    assert kept[0].content == "Be brief.\n\nRespond with a JSON object."
    assert len(kept) == 2
