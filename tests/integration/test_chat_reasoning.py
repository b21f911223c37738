"""Reasoning on the OpenAI chat API, with a model that thinks (tests/thinker.py): the thoughts
come apart from the answer, streamed as their own deltas; the template's switch turns them off;
they never break a forced tool call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration._agents import start
from tests.thinker import PROMPT, THOUGHT

pytestmark = pytest.mark.timeout(180)

ASK = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def client(
    module_appliance_factory: Any, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> openai.OpenAI:
    app = start(module_appliance_factory, demo_model_dir, tmp_path_factory.mktemp("reasoning"))
    return openai.OpenAI(base_url=app.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_thoughts_come_apart_from_the_answer(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="thinker", messages=ASK, max_tokens=40)
    m = r.choices[0].message
    extra = m.model_extra or {}
    assert extra["reasoning_content"].strip() == THOUGHT
    assert extra.get("reasoning", extra["reasoning_content"]).strip() == THOUGHT
    assert "<think>" not in (m.content or "") and THOUGHT not in (m.content or "")


def test_streamed_reasoning_deltas_reassemble_to_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="thinker", messages=ASK, max_tokens=40)
    thought, text = "", ""
    for chunk in client.chat.completions.create(
        model="thinker", messages=ASK, max_tokens=40, stream=True
    ):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        thought += (d.model_extra or {}).get("reasoning_content") or ""
        text += d.content or ""
    m = whole.choices[0].message
    assert thought == (m.model_extra or {})["reasoning_content"]
    assert text == (m.content or "")


def test_the_templates_switch_turns_thinking_off(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="thinker",
        messages=ASK,
        max_tokens=12,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert not (r.choices[0].message.model_extra or {}).get("reasoning_content")
    off = client.chat.completions.create(
        model="thinker", messages=ASK, max_tokens=12, reasoning_effort="none"
    )
    assert not (off.choices[0].message.model_extra or {}).get("reasoning_content")


def test_thinking_does_not_break_a_forced_call(client: openai.OpenAI) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {
                "type": "object",
                "properties": {"color": {"type": "string", "enum": ["red", "blue"]}},
                "required": ["color"],
            },
        },
    }
    r = client.chat.completions.create(
        model="thinker", messages=ASK, tools=[tool], tool_choice="required", max_tokens=1500
    )
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls", m
    (call,) = m.tool_calls or []
    assert call.function.name == "pick"
    assert json.loads(call.function.arguments)["color"] in ("red", "blue")
    assert (m.model_extra or {}).get("reasoning_content")  # it thought first, then called
    assert "<think>" not in (m.content or "")
