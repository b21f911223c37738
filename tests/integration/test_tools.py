"""Tool calls and structured output on the OpenAI API, with the real `openai` SDK.

On the demo model, whose text is noise: whatever it "wants", the grammar makes a forced call or
a schema-bound answer valid, so every check here is of the guarantee, not of the model's sense.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.timeout(240)

APPLIANCE_OVERRIDES = ("logging.file=none", "models.catalog.demo.max_tokens=256")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
            "required": ["tz"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def client(module_appliance: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=module_appliance.url + "/v1", api_key="none", max_retries=0)


def _check_calls(message: Any) -> list[Any]:
    calls = message.tool_calls or []
    assert calls, message
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert "<tool_call>" not in (message.content or "")
    return calls


def test_a_required_call_is_a_valid_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(_check_calls(choice.message)) == 1  # one forced call unless parallel is asked


def test_a_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=200,
    )
    (call,) = _check_calls(r.choices[0].message)
    assert call.function.name == "get_time"


def test_streamed_deltas_reassemble_to_the_whole_answer(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model="demo", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict[str, str]] = {}
    content, finish, chunks_with_args = "", None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    assert not slot["id"], "the id comes once, in the call's first chunk"
                    slot["id"] = tc.id
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
                    chunks_with_args += 1
    assert finish == whole.finish_reason == "tool_calls"
    assert content == (whole.message.content or "")
    got = [(v["name"], v["arguments"]) for _, v in sorted(calls.items())]
    want = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert got == want
    assert chunks_with_args > 1, "arguments stream in fragments, not as one blob"


def test_the_sdk_stream_helper_accumulates_the_calls(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="demo", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    _check_calls(final.choices[0].message)


class Person(BaseModel):
    # Bounded fields: the demo model's noise would fill an unbounded string to max_tokens.
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model="demo",
        messages=[{"role": "user", "content": "Give me a person."}],
        response_format=Person,
        max_tokens=200,
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop", msg.content
    assert isinstance(msg.parsed, Person)


def test_json_object_is_an_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
        max_tokens=250,
    )
    choice = r.choices[0]
    if choice.finish_reason == "stop":  # noise may ramble on inside a string until cut
        assert isinstance(json.loads(choice.message.content or ""), dict)
    else:
        assert choice.finish_reason == "length"


def test_a_strict_tool_with_auto_choice_answers(client: openai.OpenAI) -> None:
    strict = json.loads(json.dumps(WEATHER))
    strict["function"]["strict"] = True
    r = client.chat.completions.create(model="demo", messages=ASK, tools=[strict], max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"x": {"type": "string", "pattern": "(?=a)"}},
                            },
                        },
                    }
                ],
                "tool_choice": "required",
            },
            400,
            "tools[0].function.parameters",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "propertyNames": {"pattern": "^a"}},
                    },
                }
            },
            400,
            "response_format.json_schema.schema",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            400,
            "tool_choice",
        ),
        ({"tool_choice": "required"}, 400, "tool_choice"),
        ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"response_format": {"type": "xml"}}, 400, "response_format.type"),
        ({"frobnicate": 1}, 400, "frobnicate"),
    ],
)
def test_bad_tool_requests_name_the_field(
    module_appliance: Any, body: dict[str, Any], status: int, param: str
) -> None:
    r = httpx.post(
        module_appliance.url + "/v1/chat/completions",
        timeout=60,
        json={"messages": ASK, "max_tokens": 4, **body},
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_tools_count_against_the_context(appliance_factory: Any) -> None:
    a = appliance_factory("logging.file=none", "models.catalog.demo.context_length=256")
    many = [
        {"type": "function", "function": {"name": f"tool_{i}", "description": "x " * 40}}
        for i in range(8)
    ]
    r = httpx.post(
        a.url + "/v1/chat/completions",
        timeout=60,
        json={"messages": ASK, "tools": many, "max_tokens": 4},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "tokens" in err["message"]


def test_a_multi_turn_conversation_with_tool_results(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="demo", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200
    )
    msg = first.choices[0].message
    (call,) = _check_calls(msg)
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    second = client.chat.completions.create(
        model="demo", messages=history, tools=[WEATHER], max_tokens=5
    )
    assert second.usage is not None and first.usage is not None
    # The call and its result are in the prompt now.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10


def test_langchain_bind_tools_gets_its_calls(module_appliance: Any) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """The weather in a city."""
        return "21"

    llm = ChatOpenAI(
        base_url=module_appliance.url + "/v1",
        api_key="none",
        model="demo",
        max_tokens=200,
        temperature=0,
    )
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    out = bound.invoke("What is the weather in Paris?")
    assert out.tool_calls and out.tool_calls[0]["name"] == "get_weather"
    assert set(out.tool_calls[0]["args"]) <= {"city", "unit"}
