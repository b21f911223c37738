"""The real model through the API: SmolLM2 answers, calls tools and fills schemas.

SmolLM2-135M-Instruct has no tool support in its chat template, so its tools come through the
fallback prompt; the grammar makes forced calls and schema-bound answers valid, and compact, so
even this small model finishes them quickly. Slow on a CPU: few prompts, short answers.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

APPLIANCE_OVERRIDES = (
    "logging.file=none",
    "models.default=smollm2",
    "models.auto_load=[smollm2]",
    "limits.max_running=8",
    "limits.queue_timeout_s=300",
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

S, INT, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(props: dict[str, Any], required: Any = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
    }


# Twenty schemas of the shapes agents ask for.
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a city", obj({"name": S, "country": S, "population": {"type": "integer", "minimum": 0}})),
    (
        "a book",
        obj(
            {
                "title": S,
                "author": S,
                "year": INT,
                "genres": {"type": "array", "items": S, "maxItems": 3},
            }
        ),
    ),
    ("a colour", obj({"color": {"type": "string", "enum": ["red", "green", "blue"]}})),
    ("a yes or no answer to: is the sky blue?", obj({"answer": B})),
    ("a temperature", obj({"celsius": {"type": "number", "minimum": -90, "maximum": 60}})),
    (
        "three numbers",
        obj({"values": {"type": "array", "items": INT, "minItems": 3, "maxItems": 3}}),
    ),
    (
        "an address",
        obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    ),
    (
        "a product",
        obj(
            {"name": S, "price": {"type": "number", "exclusiveMinimum": 0}, "in_stock": B},
            ["name", "price"],
        ),
    ),
    ("a user", obj({"user": obj({"id": INT, "email": S}), "active": B})),
    (
        "a task",
        obj(
            {
                "title": {"type": "string", "maxLength": 40},
                "priority": {"type": "string", "enum": ["low", "medium", "high"]},
                "done": B,
            }
        ),
    ),
    ("a point", obj({"x": N, "y": N})),
    ("an event", obj({"name": S, "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}})),
    (
        "a team",
        obj(
            {
                "name": S,
                "members": {
                    "type": "array",
                    # bounded: greedy SmolLM2 repeats a digit inside an open member name until
                    # max_tokens (a valid prefix, but cut: finish_reason "length")
                    "items": obj({"name": {"type": "string", "maxLength": 24}}),
                    "minItems": 1,
                    "maxItems": 2,
                },
            }
        ),
    ),
    (
        "a rating",
        obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": S}, ["stars"]),
    ),
    ("a shape", {"anyOf": [obj({"circle": obj({"r": N})}), obj({"square": obj({"side": N})})]}),
    (
        "a flight",
        obj(
            {
                "from": {"type": "string", "minLength": 3, "maxLength": 3},
                "to": {"type": "string", "minLength": 3, "maxLength": 3},
            }
        ),
    ),
    ("a recipe", obj({"dish": S, "steps": {"type": "array", "items": S, "maxItems": 2}})),
    ("a setting", obj({"key": S, "value": {"type": ["string", "integer", "boolean"]}})),
    (
        "a score",
        obj(
            {
                "home": {"type": "integer", "minimum": 0, "maximum": 20},
                "away": {"type": "integer", "minimum": 0, "maximum": 20},
            }
        ),
    ),
]


@pytest.fixture(scope="module")
def client(module_appliance: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=module_appliance.url + "/v1", api_key="none", max_retries=0, timeout=600
    )


def test_it_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        model="smollm2",
        max_tokens=20,
    )
    assert "Paris" in (r.choices[0].message.content or "")


def test_schema_answers_are_valid_every_time(client: openai.OpenAI) -> None:
    def ask(item: tuple[str, dict[str, Any]]) -> tuple[str, Any]:
        what, schema = item
        r = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": f"Describe {what} as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            },
            max_tokens=160,
        )
        return what, r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, SCHEMAS))
    bad = []
    for (what, choice), (_, schema) in zip(results, SCHEMAS, strict=True):
        try:
            assert choice.finish_reason == "stop", choice.finish_reason
            jsonschema.validate(json.loads(choice.message.content or ""), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            bad.append((what, choice.message.content, str(exc)[:200]))
    assert not bad, bad


QUESTIONS = [
    "What is the weather in Paris?",
    "Is it raining in Tokyo right now?",
    "How cold is it in Oslo, in fahrenheit?",
    "Weather for Berlin please.",
    "Do I need an umbrella in London today?",
    "What's the temperature in Madrid?",
]


def test_forced_calls_finish_well_within_160_tokens(client: openai.OpenAI) -> None:
    def ask(q: str) -> Any:
        return client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": q}],
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=160,
        )

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, QUESTIONS))
    finished = 0
    for a in answers:
        choice = a.choices[0]
        if choice.finish_reason == "tool_calls":
            (call,) = choice.message.tool_calls or []
            args = json.loads(call.function.arguments)
            jsonschema.validate(args, WEATHER["function"]["parameters"])  # type: ignore[index]
            finished += a.usage.completion_tokens <= 160  # type: ignore[union-attr]
    assert finished >= 5, [(a.choices[0].finish_reason, a.usage) for a in answers]


def test_a_tool_result_comes_back_in_the_answer(client: openai.OpenAI) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    r = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": '{"temperature_celsius": 21, "sky": "sunny"}',
            },
        ],
        tools=[WEATHER],
        max_tokens=40,
    )
    text = r.choices[0].message.content or ""
    assert "21" in text or "sunny" in text.lower(), text


def test_an_agent_session_reuses_its_previous_turn_and_the_shared_prefix(
    client: openai.OpenAI,
) -> None:
    """Turn N+1 resends turn N's prompt and answer: both come from the prompt cache, the
    generated tokens too; another session with the same system prompt and tools starts from
    the cached prefix they share."""
    system = "You are a careful coding agent. Use the tools when they help. " * 6
    tools: Any = [WEATHER] + [
        {
            "type": "function",
            "function": {
                "name": f"read_file_{i}",
                "description": "Read a file of the project",
                "parameters": obj({"path": S}),
            },
        }
        for i in range(4)
    ]

    def turn(messages: list[Any]) -> tuple[Any, Any]:
        r = client.chat.completions.create(
            model="smollm2", messages=messages, tools=tools, max_tokens=16, temperature=0
        )
        messages.append({"role": "assistant", "content": r.choices[0].message.content or ""})
        return r.usage, r.choices[0].message

    first: list[Any] = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    u1, _ = turn(first)
    first.append({"role": "user", "content": "And what is the weather in Paris?"})
    u2, _ = turn(first)
    reusable = u1.prompt_tokens + u1.completion_tokens
    assert u2.prompt_tokens_details.cached_tokens >= 0.9 * reusable, (u1, u2)

    other: list[Any] = [{"role": "system", "content": system}, {"role": "user", "content": "Yo"}]
    u3, _ = turn(other)
    # all but the last user turn and the generation prompt (a dozen tokens) was cached
    assert u3.prompt_tokens_details.cached_tokens >= u3.prompt_tokens - 16, u3
