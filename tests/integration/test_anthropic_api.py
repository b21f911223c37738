"""The Anthropic Messages API against a real appliance, with the official `anthropic` SDK and
raw SSE: answers, the exact event sequences, tools, thinking, count_tokens, errors, and the
request bodies Claude Code sends. The demo model answers (noise: the format is what is tested);
the thinking model is the demo model that thinks (tests/thinker.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from httpx_sse import connect_sse

from tests.integration._agents import AGENT_TOOLS, shape, sse, start
from tests.integration._resilience import metric
from tests.thinker import PROMPT, THOUGHT

pytestmark = pytest.mark.timeout(180)

KEY = "sk-ant-test-key"

HI = [{"role": "user", "content": "hi"}]
# Bounded strings: the demo model's noise completes a forced call in few tokens.
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "unit": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
TIME = {
    "name": "get_time",
    "description": "The time in a zone.",
    "input_schema": {
        "type": "object",
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def app(
    module_appliance_factory: Any, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    return start(
        module_appliance_factory,
        demo_model_dir,
        tmp_path_factory.mktemp("anthropic"),
        "models.catalog.demo.context_length=8192",
        # One slot, no queue: a second request while one generates finds the server busy.
        "limits.max_running=1",
        "limits.max_queued=0",
        env={"LMX_API_KEYS": KEY},
    )


@pytest.fixture(scope="module")
def client(app: Any) -> anthropic.Anthropic:
    # max_retries=0: a retry must not hide an error.
    return anthropic.Anthropic(base_url=app.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(app: Any) -> Any:
    with httpx.Client(base_url=app.url, timeout=120, headers={"x-api-key": KEY}) as c:
        yield c


# -- answers


def test_create(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model="claude-opus-4-6", max_tokens=12, messages=HI)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == "claude-opus-4-6"  # the name the client sent
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None
    assert m.usage.output_tokens == 12 and m.usage.input_tokens > 0


def test_stream_accumulates_to_the_same_message(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model="claude-x", max_tokens=12, messages=HI)
    with client.messages.stream(model="claude-x", max_tokens=12, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    # The prompt was cached by the first request: read from the cache, counted apart.
    u = final.usage
    assert u.cache_read_input_tokens and u.cache_read_input_tokens > 0
    w = whole.usage
    assert u.input_tokens + u.cache_read_input_tokens == w.input_tokens + (
        w.cache_read_input_tokens or 0
    )


def test_text_event_sequence(http: httpx.Client) -> None:
    events = sse(http, "/v1/messages", {"model": "claude-x", "max_tokens": 8, "messages": HI})
    assert shape(events) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    for name, data in events:
        assert data["type"] == name  # the SSE event name is the payload's type
    start_ev = events[0][1]["message"]
    assert start_ev["content"] == [] and start_ev["stop_reason"] is None
    assert start_ev["model"] == "claude-x"
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"text_delta"}
    assert all(d["index"] == 0 for n, d in events if n.startswith("content_block"))
    last = events[-2][1]
    assert last["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert last["usage"]["output_tokens"] == 8


def test_stop_sequence(client: anthropic.Anthropic) -> None:
    text = client.messages.create(model="claude-x", max_tokens=12, messages=HI).content[0].text
    word = text.split()[2]
    m = client.messages.create(
        model="claude-x", max_tokens=12, messages=HI, stop_sequences=["zzz", word]
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert word not in m.content[0].text and text.startswith(m.content[0].text)


def test_prefill_is_continued(client: anthropic.Anthropic) -> None:
    m = client.messages.create(
        model="claude-x",
        max_tokens=6,
        messages=[*HI, {"role": "assistant", "content": "The answer:"}],
    )
    again = client.messages.create(
        model="claude-x",
        max_tokens=6,
        messages=[*HI, {"role": "assistant", "content": "Something else"}],
    )
    assert m.content[0].text != again.content[0].text  # the prefill is part of the prompt


# -- tools


@pytest.mark.parametrize(
    "choice", [{"type": "any"}, {"type": "tool", "name": "get_time"}, {"type": "any"}]
)
def test_forced_tool_use_is_valid(client: anthropic.Anthropic, choice: dict[str, Any]) -> None:
    msgs = [{"role": "user", "content": "What is the weather and time? " * (1 + len(choice))}]
    m = client.messages.create(
        model="claude-x", max_tokens=200, messages=msgs, tools=[WEATHER, TIME], tool_choice=choice
    )
    assert m.stop_reason == "tool_use", m
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].id.startswith("toolu_")
    if choice["type"] == "tool":
        assert uses[0].name == "get_time"
    schema = {t["name"]: t["input_schema"] for t in (WEATHER, TIME)}[uses[0].name]
    jsonschema.validate(uses[0].input, schema)


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(
        model="claude-x",
        max_tokens=200,
        messages=msgs,
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    use = next(b for b in first.content if b.type == "tool_use")
    msgs += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"},
                {"type": "text", "text": "Thanks. Summarise."},
            ],
        },
    ]
    second = client.messages.create(model="claude-x", max_tokens=8, messages=msgs, tools=[WEATHER])
    assert second.stop_reason in ("max_tokens", "end_turn", "tool_use")
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) > (
        first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    )
    # An error result is accepted too.
    msgs[-1]["content"][0] = {
        "type": "tool_result",
        "tool_use_id": use.id,
        "content": [{"type": "text", "text": "no such city"}],
        "is_error": True,
    }
    assert client.messages.create(model="claude-x", max_tokens=4, messages=msgs, tools=[WEATHER])


def test_tool_use_event_sequence(http: httpx.Client) -> None:
    body = {
        "model": "claude-x",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    events = sse(http, "/v1/messages", body)
    assert shape(events) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    block = next(d["content_block"] for n, d in events if n == "content_block_start")
    assert block["type"] == "tool_use" and block["name"] == "get_weather"
    assert block["id"].startswith("toolu_") and block["input"] == {}
    parts = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert {p["type"] for p in parts} == {"input_json_delta"}
    jsonschema.validate(
        json.loads("".join(p["partial_json"] for p in parts)), WEATHER["input_schema"]
    )
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_streamed_tool_use_through_the_sdk(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="claude-x",
        max_tokens=200,
        messages=[{"role": "user", "content": "Time?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "any"},
    ) as stream:
        final = stream.get_final_message()
    use = next(b for b in final.content if b.type == "tool_use")
    schema = {t["name"]: t["input_schema"] for t in (WEATHER, TIME)}[use.name]
    jsonschema.validate(use.input, schema)
    assert final.stop_reason == "tool_use"


def test_structured_output(client: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 10}, "n": {"type": "integer"}},
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    for prompt in ("Give me JSON.", "Another one."):
        m = client.messages.create(
            model="claude-x",
            max_tokens=200,
            messages=[{"role": "user", "content": prompt}],
            output_config={"format": {"type": "json_schema", "schema": schema}},
        )
        assert m.stop_reason == "end_turn", m
        jsonschema.validate(json.loads(m.content[0].text), schema)


# -- thinking (the thinking test model)


def test_thinking_blocks(client: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": PROMPT}]
    m = client.messages.create(
        model="claude-think-1",
        max_tokens=20,
        messages=msgs,
        thinking={"type": "enabled", "budget_tokens": 16},
    )
    assert [b.type for b in m.content] == ["thinking", "text"], m.content
    assert m.content[0].thinking.strip() == THOUGHT and m.content[0].signature
    off = client.messages.create(model="claude-think-1", max_tokens=20, messages=msgs)
    assert [b.type for b in off.content] == ["text"]  # thinking not enabled: none shown
    # The signed thinking goes back in the history unchanged.
    again = client.messages.create(
        model="claude-think-1",
        max_tokens=4,
        messages=[
            *msgs,
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
            {"role": "user", "content": "and?"},
        ],
        thinking={"type": "enabled", "budget_tokens": 2},
    )
    assert again.content and again.content[0].type == "thinking"


def test_thinking_budget_is_enforced(client: anthropic.Anthropic) -> None:
    # This prompt thinks past 20 tokens by itself: a budget of 3 ends it at 3.
    msgs = [{"role": "user", "content": "Hello there"}]
    m = client.messages.create(
        model="claude-think-1",
        max_tokens=12,
        messages=msgs,
        thinking={"type": "enabled", "budget_tokens": 3},
    )
    kinds = [b.type for b in m.content]
    assert kinds[0] == "thinking" and "text" in kinds, m.content
    free = client.messages.create(
        model="claude-think-1",
        max_tokens=12,
        messages=msgs,
        thinking={"type": "adaptive"},
    )
    assert [b.type for b in free.content] == ["thinking"]  # no budget: thinking fills it all
    assert len(m.content[0].thinking) < len(free.content[0].thinking)


def test_thinking_event_sequence(http: httpx.Client) -> None:
    body = {
        "model": "claude-think-1",
        "max_tokens": 12,
        "messages": [{"role": "user", "content": PROMPT}],
        "thinking": {"type": "enabled", "budget_tokens": 10},
    }
    events = sse(http, "/v1/messages", body)
    assert shape(events) == [
        "message_start",
        "content_block_start",  # thinking
        "content_block_delta",  # thinking_delta..., then signature_delta
        "content_block_stop",
        "content_block_start",  # text
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    starts = [d for n, d in events if n == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["thinking", "text"]
    assert [s["index"] for s in starts] == [0, 1]
    first = [
        d["delta"]["type"] for n, d in events if n == "content_block_delta" and d["index"] == 0
    ]
    assert set(first[:-1]) == {"thinking_delta"} and first[-1] == "signature_delta"
    thought = "".join(
        d["delta"].get("thinking", "") for n, d in events if n == "content_block_delta"
    )
    assert thought.strip() == THOUGHT


def test_thinking_through_the_sdk_stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="claude-think-1",
        max_tokens=12,
        messages=[{"role": "user", "content": PROMPT}],
        thinking={"type": "enabled", "budget_tokens": 10},
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].signature and final.content[0].thinking.strip() == THOUGHT


# -- count_tokens


def test_count_tokens_matches_the_prompt(client: anthropic.Anthropic, http: httpx.Client) -> None:
    kw: dict[str, Any] = {
        "model": "claude-x",
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "count me"}],
        "tools": [WEATHER],
    }
    counted = client.messages.count_tokens(**kw).input_tokens
    events = sse(http, "/v1/messages", {**kw, "max_tokens": 1})
    assert counted == events[0][1]["message"]["usage"]["input_tokens"]
    assert counted > client.messages.count_tokens(model="claude-x", messages=HI).input_tokens


# -- what Claude Code sends


def _claude_code_body(stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "temperature": 1,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {
                "type": "text",
                "text": "You are an interactive CLI tool that helps users with software "
                "engineering tasks.\n\n# Tone and style\nBe concise.",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "<system-reminder>\nAs you answer the user's questions, you can "
                        "use the following context.\n</system-reminder>",
                    },
                    {
                        "type": "text",
                        "text": "list the files here",
                        "cache_control": {"type": "ephemeral"},
                    },
                ],
            }
        ],
        "tools": AGENT_TOOLS,
        "metadata": {"user_id": "user_0123abcd_account__session_4567"},
        "stream": stream,
        **extra,
    }


def test_claude_code_requests_are_answered(http: httpx.Client) -> None:
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        "x-api-key": KEY,
        "user-agent": "claude-cli/2.0.0 (external, cli)",
    }
    events = sse(http, "/v1/messages?beta=true", _claude_code_body(True), headers=headers)
    assert shape(events)[0] == "message_start" and shape(events)[-1] == "message_stop"
    stop = events[-2][1]["delta"]["stop_reason"]
    assert stop in ("end_turn", "max_tokens", "tool_use")
    # A turn with a tool call and its result, thinking enabled with Claude Code's budget.
    body = _claude_code_body(False, thinking={"type": "enabled", "budget_tokens": 31999})
    body["model"] = "claude-think-opus"
    body["max_tokens"] = 8
    body["messages"] += [
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should list them.", "signature": "c2ln"},
                {"type": "text", "text": "Listing."},
                {"type": "tool_use", "id": "toolu_01A", "name": "LS", "input": {"path": "/w"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01A",
                    "content": "- a.py\n- b.py",
                    "cache_control": {"type": "ephemeral"},
                }
            ],
        },
    ]
    r = http.post("/v1/messages?beta=true", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "claude-think-opus"
    # Claude Code counts tokens with the same body.
    count = {k: v for k, v in body.items() if k not in ("max_tokens", "stream", "metadata")}
    r = http.post("/v1/messages/count_tokens?beta=true", json=count, headers=headers)
    assert r.status_code == 200 and r.json()["input_tokens"] > 500


def test_many_tools_forced_stream_is_valid(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="claude-x",
        max_tokens=300,
        messages=[{"role": "user", "content": "Find the shell id."}],
        tools=[*AGENT_TOOLS, TIME],
        tool_choice={"type": "tool", "name": "KillShell"},
    ) as stream:
        final = stream.get_final_message()
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.name == "KillShell"
    jsonschema.validate(use.input, AGENT_TOOLS[15]["input_schema"])


# -- errors, in Anthropic's shape


@pytest.mark.parametrize(
    ("body", "status", "kind", "says"),
    [
        ({"temperatur": 1}, 400, "invalid_request_error", "temperatur"),
        ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
        ({"model": "gpt-4o-unknown"}, 404, "not_found_error", "gpt-4o-unknown"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "x",
                                },
                            }
                        ],
                    }
                ]
            },
            400,
            "invalid_request_error",
            "text only",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            400,
            "invalid_request_error",
            "web_search_20250305",
        ),
        (
            {"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]},
            400,
            "invalid_request_error",
            "mcp_servers",
        ),
        ({"container": "c1"}, 400, "invalid_request_error", "container"),
        ({"tool_choice": {"type": "any"}}, 400, "invalid_request_error", "tool_choice"),
    ],
)
def test_errors_in_anthropic_shape(
    http: httpx.Client, body: dict[str, Any], status: int, kind: str, says: str
) -> None:
    r = http.post(
        "/v1/messages", json={"model": "claude-x", "max_tokens": 5, "messages": HI, **body}
    )
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["type"] == "error" and doc["error"]["type"] == kind
    assert says in doc["error"]["message"] and doc["request_id"] == r.headers["x-request-id"]


def test_sdk_raises_typed_errors(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=4, messages=HI)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=HI)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-x", max_tokens=4, messages=[])


def test_unknown_routes_and_methods_answer_anthropic_errors(http: httpx.Client) -> None:
    r = http.get("/v1/messages")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/messages/batches", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_metrics_count_the_anthropic_api(app: Any, client: anthropic.Anthropic) -> None:
    client.messages.create(model="claude-x", max_tokens=2, messages=HI)
    n = metric(
        app.url,
        "lmx_requests_total",
        api="anthropic",
        model="demo",
        endpoint="/v1/messages",
        status="200",
    )
    assert n is not None and n >= 1
    models = httpx.get(app.url + "/v1/models", headers={"x-api-key": KEY}).json()["data"]
    exact = next(m for m in models if m["id"] == "exact-name")
    assert exact["alias_of"] == "demo"
    demo = next(m for m in models if m["id"] == "demo")
    assert "claude-*" in demo["aliases"]


def test_max_tokens_above_the_limit_is_clamped(client: anthropic.Anthropic) -> None:
    # Claude Code asks for 32,000; the demo model's catalog limit (512) applies instead.
    m = client.messages.create(
        model="claude-x", max_tokens=32000, messages=HI, stop_sequences=["e"]
    )
    assert m.stop_reason in ("stop_sequence", "end_turn", "max_tokens")


# -- auth, the busy server, failures


def test_auth_by_x_api_key_or_bearer(app: Any) -> None:
    body = {"model": "claude-x", "max_tokens": 1, "messages": HI}
    url = app.url + "/v1/messages"
    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    for headers in ({"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}):
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=app.url, api_key="wrong", max_retries=0).messages.create(
            model="claude-x", max_tokens=1, messages=HI
        )


def _until_free(http: httpx.Client) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = http.post("/v1/messages", json={"model": "claude-x", "max_tokens": 1, "messages": HI})
        if r.status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError("the slot was never freed")


def test_busy_server_answers_529_overloaded(http: httpx.Client) -> None:
    long = {"model": "claude-x", "max_tokens": 500, "messages": HI, "stream": True}
    with http.stream("POST", "/v1/messages", json=long) as held:
        assert held.status_code == 200
        next(held.iter_lines())  # generating: the one slot is taken
        r = http.post("/v1/messages", json={"model": "claude-x", "max_tokens": 1, "messages": HI})
        assert r.status_code == 529, r.text
        assert r.json()["error"]["type"] == "overloaded_error"
        assert int(r.headers["retry-after"]) >= 1
    _until_free(http)


def test_failure_mid_stream_is_an_error_event(app: Any, http: httpx.Client) -> None:
    # Last in the module: the thinking model's generation thread dies (and is reloaded).
    body = {
        "model": "claude-think-x",
        "max_tokens": 4000,
        "messages": [{"role": "user", "content": "Hello there"}],
        "thinking": {"type": "enabled", "budget_tokens": 3000},
        "stream": True,
    }
    names: list[str] = []
    with connect_sse(http, "POST", "/v1/messages", json=body) as source:
        for e in source.iter_sse():
            names.append(e.event)
            if e.event == "content_block_delta" and names.count(e.event) == 1:
                r = http.post("/testing/faults", json={"kill_model": "thinker"})
                assert r.status_code == 200, r.text
            if e.event == "error":
                err = json.loads(e.data)
                break
    assert names[0] == "message_start" and names[-1] == "error", names
    assert "message_stop" not in names
    assert err["type"] == "error" and err["error"]["type"] == "api_error"
    _until_free(http)
