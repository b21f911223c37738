"""Token-exact parity: the appliance's greedy output equals mlx_lm's own generate on the demo
model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

pytestmark = pytest.mark.timeout(120)

APPLIANCE_OVERRIDES = ("logging.file=none",)

MAX_TOKENS = 24

CHATS = [
    [{"role": "user", "content": "hello"}],
    [
        {"role": "system", "content": "You are a miller."},
        {"role": "user", "content": "How is flour made from wheat?"},
    ],
    [
        {"role": "user", "content": "Count the boats."},
        {"role": "assistant", "content": "One, two."},
        {"role": "user", "content": "And the rest?"},
    ],
]
PROMPTS = ["hello", "The old bridge over the river", "Salt, bread and a"]


@pytest.fixture(scope="module")
def reference(demo_model_dir: Path) -> Any:
    """mlx_lm's generate on the same folder: (text, token ids, finish reason) for a prompt."""
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(demo_model_dir))[:2]

    def run(prompt: Any) -> tuple[str, list[int], str]:
        text, tokens, finish = "", [], ""
        for r in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS):
            text += r.text
            if r.finish_reason != "stop":  # the end-of-sequence token is not output
                tokens.append(int(r.token))
            finish = r.finish_reason or finish
        return text, tokens, finish

    return tokenizer, run


@pytest.fixture(scope="module")
def http(module_appliance: Any) -> Any:
    with httpx.Client(base_url=module_appliance.url, timeout=60) as c:
        yield c


def _stream(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with connect_sse(http, "POST", path, json=body) as source:
        datas = [s.data for s in source.iter_sse()]
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    usage = chunks[-1]["usage"]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    if path.endswith("chat/completions"):
        text = "".join(c["delta"].get("content") or "" for c in choices)
    else:
        text = "".join(c["text"] for c in choices)
    finish = [c["finish_reason"] for c in choices if c["finish_reason"]]
    assert len(finish) == 1
    return text, usage, finish[0]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("messages", CHATS, ids=["hello", "system", "multi-turn"])
def test_chat_parity(http: httpx.Client, reference: Any, messages: list[Any], stream: bool) -> None:
    tokenizer, run = reference
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want_text, want_tokens, want_finish = run(prompt)
    body = {"messages": messages, "max_tokens": MAX_TOKENS}
    if stream:
        text, usage, finish = _stream(http, "/v1/chat/completions", body)
    else:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        text, usage = data["choices"][0]["message"]["content"], data["usage"]
        finish = data["choices"][0]["finish_reason"]
    assert text == want_text
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["completion_tokens"] == len(want_tokens)
    assert finish == want_finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_parity(http: httpx.Client, reference: Any, prompt: str, stream: bool) -> None:
    tokenizer, run = reference
    want_text, want_tokens, want_finish = run(prompt)  # mlx_lm encodes the string itself
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS}
    if stream:
        text, usage, finish = _stream(http, "/v1/completions", body)
    else:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        text, usage, finish = (
            data["choices"][0]["text"],
            data["usage"],
            data["choices"][0]["finish_reason"],
        )
    assert text == want_text
    assert usage["prompt_tokens"] == len(tokenizer.encode(prompt))
    assert usage["completion_tokens"] == len(want_tokens)
    assert finish == want_finish


def test_token_ids_match(http: httpx.Client, reference: Any) -> None:
    """Token by token: the logprobs tokens are mlx_lm's tokens, not only the same text."""
    tokenizer, run = reference
    prompt = PROMPTS[1]
    _, want_tokens, _ = run(prompt)
    r = http.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "logprobs": 0}
    )
    got = r.json()["choices"][0]["logprobs"]["tokens"]
    assert got == [tokenizer.decode([t]) for t in want_tokens]
