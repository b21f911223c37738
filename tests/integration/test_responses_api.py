"""The OpenAI Responses API against a real appliance, with the official `openai` SDK and raw
SSE: answers, the streamed event sequences, function calls, previous_response_id and the store,
structured output, reasoning, errors, and the request bodies Codex sends. The demo model answers
(noise: the format is what is tested); the thinking model is the demo model that thinks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from httpx_sse import connect_sse

from tests.integration._agents import AGENT_TOOLS, shape, sse, start
from tests.integration._resilience import metric
from tests.thinker import PROMPT, THOUGHT

pytestmark = pytest.mark.timeout(180)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "unit": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
TIME = {
    "type": "function",
    "name": "get_time",
    "description": "The time in a zone.",
    "parameters": {
        "type": "object",
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
    "strict": True,
}
SCHEMAS = {t["name"]: t["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def app(
    module_appliance_factory: Any, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    return start(
        module_appliance_factory,
        demo_model_dir,
        tmp_path_factory.mktemp("responses"),
        "models.catalog.demo.context_length=8192",
        "responses.store_max=3",
    )


@pytest.fixture(scope="module")
def client(app: Any) -> openai.OpenAI:
    # max_retries=0: a retry must not hide an error.
    return openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(app: Any) -> Any:
    with httpx.Client(base_url=app.url, timeout=120) as c:
        yield c


def _text(r: Any) -> str:
    return "".join(
        c.text
        for it in r.output
        if it.type == "message"
        for c in it.content
        if c.type == "output_text"
    )


# -- answers


def test_create(client: openai.OpenAI) -> None:
    r = client.responses.create(model="gpt-5-codex", input="hi", max_output_tokens=10)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.model == "gpt-5-codex"  # the name the client sent
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [it.type for it in r.output] == ["message"] and r.output_text
    assert r.output_text == _text(r)
    assert r.usage.output_tokens == 10 and r.usage.input_tokens > 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    # Absent sampling fields mean greedy: the same input, the same answer.
    again = client.responses.create(model="gpt-5-codex", input="hi", max_output_tokens=10)
    assert again.output_text == r.output_text
    assert again.usage.input_tokens_details.cached_tokens > 0  # the prompt cache was read


def test_stream_through_the_sdk(client: openai.OpenAI) -> None:
    whole = client.responses.create(model="gpt-5", input="hello", max_output_tokens=10)
    with client.responses.stream(model="gpt-5", input="hello", max_output_tokens=10) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # Cut by max_output_tokens: the stream ends with response.incomplete (the SDK's
    # get_final_response waits for response.completed only, as against OpenAI's own API).
    last = events[-1]
    assert last.type == "response.incomplete"
    assert "".join(deltas) == last.response.output_text == whole.output_text
    assert last.response.usage.output_tokens == 10


class Answer(pydantic.BaseModel):
    answer: str = pydantic.Field(max_length=10)
    n: int


def test_parse_and_stream_a_schema_bound_answer(client: openai.OpenAI) -> None:
    r = client.responses.parse(model="gpt-5", input="JSON, please.", text_format=Answer)
    assert isinstance(r.output_parsed, Answer), r
    with client.responses.stream(
        model="gpt-5", input="JSON, please.", text_format=Answer, store=False
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_parsed == r.output_parsed


def test_text_event_sequence(http: httpx.Client) -> None:
    body = {"model": "gpt-5", "input": "hi", "max_output_tokens": 6, "store": False}
    events = sse(http, "/v1/responses", body)
    assert shape(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    for name, data in events:
        assert data["type"] == name
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    item = events[2][1]["item"]
    deltas = [d for n, d in events if n == "response.output_text.delta"]
    assert all(d["item_id"] == item["id"] and d["output_index"] == 0 for d in deltas)
    done = next(d for n, d in events if n == "response.output_text.done")
    assert done["text"] == "".join(d["delta"] for d in deltas)
    final = events[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == done["text"]
    assert final["usage"]["output_tokens"] == 6


def test_instructions_and_developer_messages(client: openai.OpenAI) -> None:
    plain = client.responses.create(model="gpt-5", input="hi", max_output_tokens=6)
    told = client.responses.create(
        model="gpt-5", input="hi", instructions="Answer in French.", max_output_tokens=6
    )
    dev = client.responses.create(
        model="gpt-5",
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        ],
        max_output_tokens=6,
    )
    assert told.usage.input_tokens > plain.usage.input_tokens
    assert told.output_text == dev.output_text  # both become the one system message
    assert told.instructions == "Answer in French."


# -- function calls


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "name": "get_time"}, "required"]
)
def test_forced_function_call_is_valid(client: openai.OpenAI, choice: Any) -> None:
    prompt = "What is the weather and time? " * (1 + len(str(choice)) % 3)
    r = client.responses.create(
        model="gpt-5", input=prompt, tools=[WEATHER, TIME], tool_choice=choice, store=False
    )
    calls = [it for it in r.output if it.type == "function_call"]
    assert calls, r.output
    for c in calls:
        assert c.call_id and c.id.startswith("fc_") and c.status == "completed"
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    if isinstance(choice, dict):
        assert [c.name for c in calls] == ["get_time"]


def test_function_call_round_trip(client: openai.OpenAI) -> None:
    inp: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.responses.create(
        model="gpt-5",
        input=inp,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        store=False,
    )
    call = next(it for it in first.output if it.type == "function_call")
    inp += [it.model_dump(exclude_none=True) for it in first.output]
    inp.append({"type": "function_call_output", "call_id": call.call_id, "output": "18 C"})
    second = client.responses.create(
        model="gpt-5", input=inp, tools=[WEATHER], max_output_tokens=6, store=False
    )
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens
    # An output given as input_text parts reads the same.
    inp[-1] = {
        "type": "function_call_output",
        "call_id": call.call_id,
        "output": [{"type": "input_text", "text": "18 C"}],
    }
    third = client.responses.create(
        model="gpt-5", input=inp, tools=[WEATHER], max_output_tokens=6, store=False
    )
    assert third.output_text == second.output_text


def test_function_call_event_sequence(http: httpx.Client) -> None:
    body = {
        "model": "gpt-5",
        "input": "Weather?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "store": False,
    }
    events = sse(http, "/v1/responses", body)
    assert shape(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = events[2][1]["item"]
    assert added["type"] == "function_call" and added["name"] == "get_weather"
    assert added["arguments"] == "" and added["status"] == "in_progress"
    args = "".join(d["delta"] for n, d in events if n == "response.function_call_arguments.delta")
    done = next(d for n, d in events if n == "response.function_call_arguments.done")
    assert done["arguments"] == args
    jsonschema.validate(json.loads(args), WEATHER["parameters"])
    item = events[-2][1]["item"]
    assert item["arguments"] == args and item["call_id"] == added["call_id"]


def test_streamed_call_through_the_sdk(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model="gpt-5", input="Time?", tools=[WEATHER, TIME], tool_choice="required", store=False
    ) as stream:
        final = stream.get_final_response()
    call = next(it for it in final.output if it.type == "function_call")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_structured_output(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 10}, "n": {"type": "integer"}},
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    for prompt in ("Give me JSON.", "Another one."):
        r = client.responses.create(
            model="gpt-5",
            input=prompt,
            text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}},
            store=False,
        )
        assert r.status == "completed", r
        jsonschema.validate(json.loads(r.output_text), schema)
    # json_object bounds no string: the demo model's noise may fill one to the limit, so an
    # answer cut short is only checked to be an object begun.
    r = client.responses.create(
        model="gpt-5",
        input="JSON?",
        text={"format": {"type": "json_object"}},
        max_output_tokens=40,
        store=False,
    )
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)
    else:
        assert r.output_text.lstrip().startswith("{")


# -- the store: previous_response_id, GET, DELETE


def test_previous_response_id_continues(client: openai.OpenAI) -> None:
    first = client.responses.create(model="gpt-5", input="hi", max_output_tokens=6)
    follow = client.responses.create(
        model="gpt-5", input="and?", previous_response_id=first.id, max_output_tokens=6
    )
    # The same conversation, sent whole and stateless, is the same prompt: the same answer.
    whole = client.responses.create(
        model="gpt-5",
        input=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
            {"role": "user", "content": "and?"},
        ],
        max_output_tokens=6,
        store=False,
    )
    assert follow.output_text == whole.output_text
    assert follow.usage.input_tokens == whole.usage.input_tokens
    # The continuation read its prefix from the prompt cache.
    assert follow.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    assert follow.previous_response_id == first.id
    got = client.responses.retrieve(follow.id)
    assert got.id == follow.id and got.output_text == follow.output_text


def test_store_false_and_delete_and_eviction(client: openai.OpenAI) -> None:
    kept = client.responses.create(model="gpt-5", input="one", max_output_tokens=2)
    gone = client.responses.create(model="gpt-5", input="two", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(gone.id)
    assert gone.id in str(e.value)
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    # The store keeps 3 here: the fourth newest is dropped, and naming it is a 404 naming it.
    ids = [
        client.responses.create(model="gpt-5", input=str(i), max_output_tokens=1).id
        for i in range(4)
    ]
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="gpt-5", input="x", previous_response_id=ids[0])
    assert ids[0] in str(e.value)
    assert client.responses.retrieve(ids[-1]).id == ids[-1]


# -- reasoning (the thinking model)


def test_reasoning_item_and_encrypted_content(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="gpt-5-thinking",
        input=PROMPT,
        reasoning={"effort": "low", "summary": "auto"},
        include=["reasoning.encrypted_content"],
        max_output_tokens=20,
        store=False,
    )
    kinds = [it.type for it in r.output]
    assert kinds == ["reasoning", "message"], r.output
    rs = r.output[0]
    assert rs.summary[0].text.strip() == THOUGHT and rs.encrypted_content
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    # Without include, no encrypted content; effort none switches thinking off.
    plain = client.responses.create(
        model="gpt-5-thinking", input=PROMPT, max_output_tokens=20, store=False
    )
    assert plain.output[0].type == "reasoning" and plain.output[0].encrypted_content is None
    off = client.responses.create(
        model="gpt-5-thinking",
        input=PROMPT,
        reasoning={"effort": "none"},
        max_output_tokens=8,
        store=False,
    )
    assert [it.type for it in off.output] == ["message"]
    # The next turn carries the reasoning item back, as Codex does (stateless, encrypted).
    turn = [
        {"role": "user", "content": PROMPT},
        *[it.model_dump(exclude_none=True) for it in r.output],
        {"role": "user", "content": "and?"},
    ]
    sealed = client.responses.create(
        model="gpt-5-thinking", input=turn, max_output_tokens=4, store=False
    )
    # The same turn with the reasoning in clear (its summary) renders the same prompt.
    turn[1] = {**turn[1], "encrypted_content": None}
    turn[1].pop("encrypted_content")
    clear = client.responses.create(
        model="gpt-5-thinking", input=turn, max_output_tokens=4, store=False
    )
    assert sealed.usage.input_tokens == clear.usage.input_tokens
    assert sealed.output_text == clear.output_text


def test_reasoning_event_sequence(http: httpx.Client) -> None:
    body = {
        "model": "gpt-5-thinking",
        "input": PROMPT,
        "max_output_tokens": 20,
        "store": False,
    }
    events = sse(http, "/v1/responses", body)
    names = shape(events)
    assert names[:7] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
    ]
    assert names[7:] == [
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    thought = "".join(d["delta"] for n, d in events if n == "response.reasoning_summary_text.delta")
    assert thought.strip() == THOUGHT


# -- what Codex sends


def _codex_tools() -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = [
        {
            "type": "function",
            "name": "shell",
            "description": "Runs a shell command and returns its output.",
            "strict": False,
            "parameters": {
                "type": "object",
                "properties": {
                    "command": {"type": "array", "items": {"type": "string"}},
                    "workdir": {"type": "string"},
                    "timeout_ms": {"type": "number"},
                },
                "required": ["command"],
                "additionalProperties": False,
            },
        },
        {
            "type": "function",
            "name": "update_plan",
            "description": "Updates the task plan.",
            "strict": False,
            "parameters": {
                "type": "object",
                "properties": {
                    "explanation": {"type": "string"},
                    "plan": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "step": {"type": "string"},
                                "status": {"type": "string"},
                            },
                            "required": ["step", "status"],
                            "additionalProperties": False,
                        },
                    },
                },
                "required": ["plan"],
                "additionalProperties": False,
            },
        },
        {
            "type": "custom",
            "name": "apply_patch",
            "description": "Use the apply_patch tool to edit files.",
            "format": {
                "type": "grammar",
                "syntax": "lark",
                "definition": 'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch"',
            },
        },
    ]
    # MCP tools, as Codex flattens them.
    for t in AGENT_TOOLS[16:]:
        tools.append(
            {
                "type": "function",
                "name": t["name"],
                "description": t["description"],
                "strict": False,
                "parameters": t["input_schema"],
            }
        )
    return tools


def _codex_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-5-codex",
        "instructions": "You are Codex, based on GPT-5. You are running as a coding agent in "
        "the Codex CLI on a user's computer.",
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [
                    {
                        "type": "input_text",
                        "text": "<environment_context>\n  <cwd>/w</cwd>\n  <approval_policy>"
                        "on-request</approval_policy>\n</environment_context>",
                    }
                ],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "list the files"}],
            },
        ],
        "tools": _codex_tools(),
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "max_output_tokens": 12,
        **extra,
    }


def test_codex_requests_are_answered(http: httpx.Client) -> None:
    headers = {
        "authorization": "Bearer unused",
        "originator": "codex_cli_rs",
        "session_id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "openai-beta": "responses=experimental",
        "user-agent": "codex_cli_rs/0.46.0",
    }
    events = sse(http, "/v1/responses", _codex_body(), headers=headers)
    names = shape(events)
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] in ("response.completed", "response.incomplete")
    # The next turn, stateless: the earlier output (a reasoning item with encrypted content,
    # a call and its output, a custom tool call) sent back whole, with the thinking model.
    body = _codex_body(model="gpt-5-thinking-codex", max_output_tokens=6)
    body["input"] += [
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "Listing files."}],
            "encrypted_content": "gAAAAAB-not-ours",
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "name": "shell",
            "arguments": json.dumps({"command": ["ls"], "workdir": "/w"}),
            "call_id": "call_1",
        },
        {
            "type": "function_call_output",
            "call_id": "call_1",
            "output": json.dumps({"output": "a.py\nb.py\n", "metadata": {"exit_code": 0}}),
        },
        {
            "type": "custom_tool_call",
            "id": "ctc_1",
            "name": "apply_patch",
            "call_id": "call_2",
            "input": "*** Begin Patch\n*** End Patch",
            "status": "completed",
        },
        {"type": "custom_tool_call_output", "call_id": "call_2", "output": "Done!"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "There are two files."}],
        },
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "ok"}]},
    ]
    events = sse(http, "/v1/responses", body, headers=headers)
    assert shape(events)[-1] in ("response.completed", "response.incomplete")
    final = events[-1][1]["response"]
    assert final["model"] == "gpt-5-thinking-codex" and final["store"] is False
    assert final["prompt_cache_key"] == body["prompt_cache_key"]


def test_codex_forced_custom_tool(http: httpx.Client) -> None:
    body = _codex_body(
        stream=False,
        max_output_tokens=200,
        tool_choice={"type": "custom", "name": "apply_patch"},
        reasoning={"effort": "minimal"},
    )
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    items = r.json()["output"]
    call = next(it for it in items if it["type"] == "custom_tool_call")
    assert call["name"] == "apply_patch" and isinstance(call["input"], str)


# -- errors


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"temperatur": 1}, 400, "temperatur"),
        ({"model": "o9-unknown"}, 404, "o9-unknown"),
        ({"tools": [{"type": "web_search_preview"}]}, 400, "web_search_preview"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, 400, "file_search"),
        ({"tools": [{"type": "computer_use_preview"}]}, 400, "computer_use_preview"),
        ({"include": ["file_search_call.results"]}, 400, "file_search_call.results"),
        ({"previous_response_id": "resp_nope"}, 404, "resp_nope"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input_image",
        ),
        ({"background": True}, 400, "background"),
    ],
)
def test_errors_in_openai_shape(
    http: httpx.Client, body: dict[str, Any], status: int, says: str
) -> None:
    r = http.post("/v1/responses", json={"model": "gpt-5", "input": "hi", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert says in err["message"] and {"message", "type", "param", "code"} <= set(err)


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="gpt-5", input="hi", extra_body={"frequency_penalty": 1})
    assert "frequency_penalty" in str(e.value)


def test_metrics_count_the_responses_api(app: Any, client: openai.OpenAI) -> None:
    client.responses.create(model="gpt-5", input="hi", max_output_tokens=2, store=False)
    n = metric(
        app.url,
        "lmx_requests_total",
        api="responses",
        model="demo",
        endpoint="/v1/responses",
        status="200",
    )
    assert n is not None and n >= 1


def test_failure_mid_stream_is_response_failed(app: Any, http: httpx.Client) -> None:
    # Last in the module: the thinking model's generation thread dies (and is reloaded).
    body = {
        "model": "gpt-5-thinking",
        "input": "Hello there",
        "max_output_tokens": 4000,
        "store": False,
        "stream": True,
    }
    names: list[str] = []
    with connect_sse(http, "POST", "/v1/responses", json=body) as source:
        for e in source.iter_sse():
            names.append(e.event)
            data = json.loads(e.data)
            if e.event == "response.reasoning_summary_text.delta" and names.count(e.event) == 1:
                r = httpx.post(
                    app.url + "/testing/faults", json={"kill_model": "thinker"}, timeout=10
                )
                assert r.status_code == 200, r.text
    assert names[0] == "response.created" and names[-1] == "response.failed", names
    failed = data["response"]
    assert failed["status"] == "failed" and failed["error"]["message"]
    assert data["sequence_number"] == len(names) - 1
