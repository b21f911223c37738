"""The Anthropic and Responses front-ends without a server: request parsing (each field honoured
or refused by name), the response store's bounds, the seal of thinking, and the statuses the
Messages API answers where it differs from the OpenAI routes."""

from __future__ import annotations

from typing import Any

import pytest

from appliance import errors as e
from appliance.api.anthropic_parsing import parse_messages
from appliance.api.errors import anthropic_body_of, is_anthropic, status_of
from appliance.api.responses_parsing import parse_response, to_messages
from appliance.api.responses_store import ResponseStore
from appliance.api.seal import Seal
from appliance.config import ResponsesConfig

HI = [{"role": "user", "content": "hi"}]


def _msgs(**kw: Any) -> Any:
    return parse_messages({"model": "claude-x", "max_tokens": 10, "messages": HI, **kw})


def _resp(**kw: Any) -> Any:
    return parse_response({"model": "gpt-5", "input": "hi", **kw})


def _refused(fn: Any, **kw: Any) -> e.InvalidRequest:
    with pytest.raises(e.InvalidRequest) as info:
        fn(**kw)
    return info.value


# -- Messages


def test_messages_defaults_are_greedy_and_thinking_off() -> None:
    p = _msgs()
    assert p.request.params.temperature == 0.0 and p.request.params.top_k == 0
    assert p.request.params.top_p == 1.0
    assert p.request.reasoning is False and not p.thinking and not p.stream
    assert p.model == "claude-x" and p.request.max_tokens == 10


def test_messages_fields_are_read() -> None:
    p = _msgs(
        system=[
            {"type": "text", "text": "A.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "B.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        ],
        temperature=0.5,
        top_k=40,
        stop_sequences=["END"],
        metadata={"user_id": "u1"},
        thinking={"type": "enabled", "budget_tokens": 64},
        tools=[{"name": "t", "description": "d", "input_schema": {"type": "object"}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stream=True,
    )
    r = p.request
    assert r.messages[0].role == "system" and "A." in r.messages[0].content
    assert "B." in r.messages[0].content
    assert r.params.temperature == 0.5 and r.params.top_k == 40
    assert "END" in r.params.stop
    assert r.reasoning is True and r.reasoning_budget == 64 and p.thinking and p.stream
    assert r.tool_choice.mode == "required" and r.parallel_tool_calls is False


def test_messages_prefill_continues_the_last_assistant_turn() -> None:
    p = _msgs(messages=[*HI, {"role": "assistant", "content": "The answer:"}])
    assert p.request.continue_final and p.request.messages[-1].role == "assistant"


def test_tool_use_and_result_become_a_call_and_its_result() -> None:
    p = _msgs(
        messages=[
            *HI,
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {"a": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "42"}],
                        "is_error": True,
                    }
                ],
            },
        ],
        tools=[{"name": "t", "input_schema": {"type": "object"}}],
    )
    roles = [m.role for m in p.request.messages]
    assert roles == ["user", "assistant", "tool"]
    call = p.request.messages[1].tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("toolu_1", "t", {"a": 1})
    assert "42" in p.request.messages[2].content


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"temperatur": 1}, "temperatur"),
        ({"max_tokens": None}, "max_tokens"),
        ({"tool_choice": {"type": "anything"}}, "tool_choice.type"),
        ({"thinking": {"type": "enabled"}}, "budget_tokens"),
        ({"system": [{"type": "text", "text": "x", "cache_control": {"type": "x"}}]}, "cache"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "document",
        ),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "bash_20250124"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_messages_refusals_name_the_field(kw: dict[str, Any], names: str) -> None:
    err = _refused(_msgs, **kw)
    assert names in err.message or names in (err.param or "")
    assert names in anthropic_body_of(err)["error"]["message"]


def test_count_tokens_needs_no_max_tokens() -> None:
    p = parse_messages({"model": "claude-x", "messages": HI}, count=True)
    assert p.request.messages[0].content == "hi"


# -- Responses


def test_responses_defaults() -> None:
    p = _resp()
    assert p.params.temperature == 0.0 and p.params.top_p == 1.0  # greedy
    assert p.store is True and not p.stream and p.reasoning is None
    assert p.items == ({"type": "message", "role": "user", "content": "hi"},)


def test_codex_fields_are_accepted() -> None:
    p = _resp(
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "minimal", "summary": "auto"},
        prompt_cache_key="k",
        store=False,
        service_tier="auto",
        truncation="auto",
        user="u",
        parallel_tool_calls=False,
        text={"format": {"type": "text"}, "verbosity": "low"},
    )
    assert p.include_encrypted and p.reasoning is False and not p.store
    assert p.truncation_auto and p.parallel_tool_calls is False
    assert p.template_kwargs == {"reasoning_effort": "minimal"}


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"temperatur": 1}, "temperatur"),
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"tools": [{"type": "code_interpreter", "container": "c"}]}, "code_interpreter"),
        ({"include": ["message.output_text.logprobs"]}, "message.output_text.logprobs"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "item references"),
        ({"service_tier": "priority"}, "service_tier"),
    ],
)
def test_responses_refusals_name_the_field(kw: dict[str, Any], names: str) -> None:
    err = _refused(_resp, **kw)
    assert names in err.message or names in (err.param or "")


def test_items_become_turns() -> None:
    msgs = to_messages(
        [
            {"role": "user", "content": "q"},
            {"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "t"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {"type": "function_call_output", "call_id": "c2", "output": "two"},
        ],
        instructions="Be brief.",
    )
    assert [m.role for m in msgs] == ["system", "user", "assistant", "tool", "tool"]
    turn = msgs[2]
    assert turn.reasoning == "t" and [c.name for c in turn.tool_calls] == ["f", "g"]
    assert msgs[3].tool_call_id == "c1" and msgs[3].name == "f"


def test_sealed_reasoning_is_read_back_only_from_its_own_server() -> None:
    seal = Seal()
    item = {"type": "reasoning", "summary": [], "encrypted_content": seal.seal("deep")}
    assert to_messages([item, {"role": "assistant", "content": []}], open_sealed=seal.open)[
        0
    ].reasoning == ("deep")
    other = Seal()
    assert other.open(item["encrypted_content"]) is None
    assert seal.verify("deep", seal.sign("deep")) and not other.verify("deep", seal.sign("deep"))


# -- the store


def _put(store: ResponseStore, rid: str, size: int = 10) -> bool:
    return store.put({"id": rid, "pad": "x" * size}, ({"role": "user", "content": "hi"},), ())


def test_store_drops_the_oldest_by_count_and_bytes() -> None:
    store = ResponseStore(ResponsesConfig(store_max=2, store_max_bytes=1 << 20))
    for rid in ("a", "b", "c"):
        assert _put(store, rid)
    assert store.get("a") is None and store.get("b") and store.get("c") and len(store) == 2
    small = ResponseStore(ResponsesConfig(store_max=10, store_max_bytes=300))
    for rid in ("a", "b", "c"):
        _put(small, rid, 100)
    assert small.get("a") is None and small.nbytes <= 300
    assert not _put(small, "huge", 1000) and small.get("huge") is None
    assert small.delete("c") and not small.delete("c")
    assert not _put(ResponseStore(ResponsesConfig(store_max=0)), "x")


# -- errors on the Messages routes


def test_messages_routes_answer_529_where_others_answer_503_or_busy_429() -> None:
    assert is_anthropic("/v1/messages") and is_anthropic("/v1/messages/count_tokens")
    assert not is_anthropic("/v1/messagesx") and not is_anthropic("/v1/responses")
    busy = e.QueueFull("all slots taken", retry_after=1)
    shedding = e.Unavailable("memory", retry_after=5)
    limited = e.RateLimited("slow down", retry_after=3)
    assert (status_of(busy), status_of(busy, anthropic=True)) == (429, 529)
    assert (status_of(shedding), status_of(shedding, anthropic=True)) == (503, 529)
    assert status_of(limited, anthropic=True) == 429
    assert anthropic_body_of(busy)["error"]["type"] == "overloaded_error"
    assert anthropic_body_of(limited)["error"]["type"] == "rate_limit_error"
    assert anthropic_body_of(e.NotFound("no model"))["error"]["type"] == "not_found_error"
