"""The OpenAI API against a real uvicorn on 127.0.0.1, with the real `openai` client and
httpx-sse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import connect_sse

pytestmark = pytest.mark.timeout(120)

APPLIANCE_OVERRIDES = ("logging.file=none",)

HELLO = [{"role": "user", "content": "Tell me about the weather in the valley."}]


@pytest.fixture(scope="module")
def url(module_appliance: Any) -> str:
    return str(module_appliance.url)


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    # max_retries=0: a retry must not hide an error.
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(url: str) -> Any:
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def sse_chunks(http: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    """Every `data:` of a stream, parsed by httpx-sse; the last one must be [DONE]."""
    with connect_sse(http, "POST", path, json={**body, "stream": True}) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        datas = [sse.data for sse in source.iter_sse()]
    assert datas and datas[-1] == "[DONE]", datas[-3:]
    assert "[DONE]" not in datas[:-1]
    return [json.loads(d) for d in datas[:-1]]


# -- the openai client ----------------------------------------------------------------------


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["smollm2", "demo"]
    assert all(m.object == "model" for m in models.data)


def test_chat_non_stream(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=12)  # type: ignore[arg-type]
    assert r.object == "chat.completion"
    assert r.model == "demo"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert r.usage is not None
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_model_defaults_to_models_default(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "demo"


def test_chat_stream_with_include_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="demo", messages=HELLO, max_tokens=16)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model="demo",
        messages=HELLO,
        max_tokens=16,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    # The usage chunk comes last, with no choices; every other chunk has no usage.
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in body)
    text = "".join(c.choices[0].delta.content or "" for c in body)
    finish = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert text == full.choices[0].message.content  # greedy: the same answer
    assert finish == [full.choices[0].finish_reason]
    assert full.usage is not None
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_chat_stream_without_include_usage_has_no_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=HELLO,
            max_tokens=4,
            stream=True,  # type: ignore[arg-type]
        )
    )
    assert chunks and all(c.usage is None and len(c.choices) == 1 for c in chunks)


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="demo", prompt="The river runs", max_tokens=10)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 10
    streamed = client.completions.create(
        model="demo",
        prompt="The river runs",
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 7}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"n": 3}, "n"),
        ({"stop": 5}, "stop"),
        ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ],
)
def test_bad_request_names_the_param(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="demo",
            messages=HELLO,
            max_tokens=2,
            extra_body=extra,  # type: ignore[arg-type]
        )
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"


# -- SSE parsed with httpx-sse --------------------------------------------------------------


def test_sse_stream_parsed_with_httpx_sse(http: httpx.Client) -> None:
    chunks = sse_chunks(http, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 8})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[:-1] == [None] * (len(chunks) - 1) and reasons[-1] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    whole = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8}).json()
    assert streamed == whole["choices"][0]["message"]["content"]


# -- sampling and output options ------------------------------------------------------------


def _chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"messages": HELLO, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _stop_word(text: str) -> str:
    """A piece from the middle of `text` that does not occur earlier in it."""
    for start in range(len(text) // 3, len(text) - 3):
        piece = text[start : start + 3]
        if piece.strip() and text.find(piece) == start:
            return piece
    raise AssertionError(f"no stop piece in {text!r}")


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_string(http: httpx.Client, as_list: bool) -> None:
    full = _chat(http, max_tokens=24)["choices"][0]["message"]["content"]
    stop = _stop_word(full)
    expected = full[: full.index(stop)]
    body = {"max_tokens": 24, "stop": [stop, "\u2603never"] if as_list else stop}
    r = _chat(http, **body)
    assert r["choices"][0]["message"]["content"] == expected
    assert r["choices"][0]["finish_reason"] == "stop"
    chunks = sse_chunks(http, "/v1/chat/completions", {"messages": HELLO, **body})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_usage_counts_tokens_up_to_the_one_that_completed_the_stop_string(
    http: httpx.Client,
) -> None:
    full = _chat(http, max_tokens=24)["choices"][0]["message"]["content"]
    stop = _stop_word(full)
    # Greedy is deterministic: the shortest max_tokens whose text holds the stop string is the
    # number of tokens up to and including the one that completed it.
    upto = next(
        n
        for n in range(1, 25)
        if stop in _chat(http, max_tokens=n)["choices"][0]["message"]["content"]
    )
    assert upto < 24  # the stop comes before the end: tokens after it would be generated
    r = _chat(http, max_tokens=24, stop=stop)
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == upto
    chunks = sse_chunks(
        http,
        "/v1/chat/completions",
        {
            "messages": HELLO,
            "max_tokens": 24,
            "stop": stop,
            "stream_options": {"include_usage": True},
        },
    )
    assert chunks[-1]["usage"]["completion_tokens"] == upto


def test_stop_string_in_completions(http: httpx.Client) -> None:
    body = {"prompt": "Bread and salt", "max_tokens": 24}
    full = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = _stop_word(full)
    r = http.post("/v1/completions", json={**body, "stop": stop}).json()
    assert r["choices"][0]["text"] == full[: full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_and_max_completion_tokens(http: httpx.Client) -> None:
    assert _chat(http, max_tokens=5)["usage"]["completion_tokens"] == 5
    assert _chat(http, max_completion_tokens=7)["usage"]["completion_tokens"] == 7
    # max_completion_tokens is the newer name and wins when both are given.
    r = _chat(http, max_tokens=3, max_completion_tokens=6)
    assert r["usage"]["completion_tokens"] == 6
    assert r["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs(http: httpx.Client) -> None:
    r = _chat(http, max_tokens=8, logprobs=True, top_logprobs=3)
    choice = r["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 8
    joined = "".join(e["token"] for e in content)
    # mlx-lm's detokenizer drops the space that starts a reply; the tokens keep it.
    assert joined in (choice["message"]["content"], " " + choice["message"]["content"])
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] <= 0 and e["bytes"] == list(e["token"].encode())
        tops = e["top_logprobs"]
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert tops[0]["token"] == e["token"]
        assert tops[0]["logprob"] == pytest.approx(e["logprob"], abs=1e-5)
    # Without logprobs, none are sent.
    assert _chat(http, max_tokens=2)["choices"][0]["logprobs"] is None


def test_chat_logprobs_streamed(http: httpx.Client) -> None:
    body = {"messages": HELLO, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    chunks = sse_chunks(http, "/v1/chat/completions", body)
    entries = [
        e
        for c in chunks
        if c["choices"][0].get("logprobs")
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert len(entries) == 6
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    whole = http.post("/v1/chat/completions", json=body).json()
    assert [e["token"] for e in entries] == [
        e["token"] for e in whole["choices"][0]["logprobs"]["content"]
    ]


def test_completion_logprobs(http: httpx.Client) -> None:
    body = {"prompt": "Salt and bread", "max_tokens": 8, "logprobs": 2}
    r = http.post("/v1/completions", json=body).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    n = r["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert "".join(lp["tokens"]) == choice["text"]
    offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    assert lp["text_offset"] == offsets
    for tok, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        assert len(top) == 2 and tok in top
    # Streamed, the offsets still count from the start of the text.
    chunks = sse_chunks(http, "/v1/completions", body)
    streamed_offsets = [
        o
        for c in chunks
        if c["choices"] and c["choices"][0].get("logprobs")
        for o in c["choices"][0]["logprobs"]["text_offset"]
    ]
    assert streamed_offsets == offsets


def test_seed_makes_sampling_repeatable(http: httpx.Client) -> None:
    def sample(seed: int) -> str:
        r = _chat(http, max_tokens=16, temperature=1.0, seed=seed)
        return str(r["choices"][0]["message"]["content"])

    first = sample(1234)
    assert sample(1234) == first
    greedy = _chat(http, max_tokens=16)["choices"][0]["message"]["content"]
    others = {sample(s) for s in (1, 2, 3)} | {first}
    # Sampling at temperature 1 is really sampling: different seeds, different texts.
    assert len(others) >= 3
    assert others != {greedy}


def test_multi_turn_chat_reuses_the_prompt_cache(http: httpx.Client, demo_model_dir: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(demo_model_dir)
    turn1 = [{"role": "user", "content": "Name three rivers near the old mill, please."}]
    r1 = _chat(http, messages=turn1, max_tokens=12)
    reply = r1["choices"][0]["message"]["content"]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And which is the longest?"},
    ]
    r2 = _chat(http, messages=turn2, max_tokens=4)
    cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    # The second prompt reuses the first one's cache up to where their tokens part (the
    # generation prompt's last token can tokenize differently once the reply follows it).
    p1 = tok.apply_chat_template(turn1, add_generation_prompt=True, tokenize=True)
    p2 = tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=True)
    assert len(p1) == r1["usage"]["prompt_tokens"] and len(p2) == r2["usage"]["prompt_tokens"]
    shared = next((i for i, (a, b) in enumerate(zip(p1, p2, strict=False)) if a != b), len(p1))
    assert shared > len(p1) - 3  # the test means something: most of turn 1 is shared
    assert shared <= cached < len(p2)


# -- request timeout ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_url(module_appliance_factory: Any) -> str:
    app = module_appliance_factory(
        "logging.file=none", "limits.request_timeout_s=0.5", "models.catalog.demo.max_tokens=2000"
    )
    return str(app.url)


def test_request_timeout_non_stream(slow_url: str) -> None:
    r = httpx.post(
        slow_url + "/v1/completions", json={"prompt": "Once", "max_tokens": 2000}, timeout=60
    )
    assert r.status_code >= 500
    err = r.json()["error"]
    assert err["code"] == "request_timeout"
    assert set(err) == {"message", "type", "param", "code"}


def test_request_timeout_stream_sends_error_then_done(slow_url: str) -> None:
    with httpx.Client(base_url=slow_url, timeout=60) as http:
        chunks = sse_chunks(http, "/v1/completions", {"prompt": "Once", "max_tokens": 2000})
        assert chunks[-1]["error"]["code"] == "request_timeout"
        assert all("error" not in c for c in chunks[:-1])
        # The server is fine afterwards.
        r = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0.8, "top_p": 0.5, "seed": 1},
        {"temperature": 0.8, "top_k": 5, "seed": -1},
        {"temperature": 0.8, "min_p": 0.1, "seed": 2**64 - 1},
        {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.05},
        {"top_k": -1},
        {"repetition_penalty": 1.3},
        {"presence_penalty": 1.5, "frequency_penalty": -1.0},
        {"logit_bias": {"10": 5.5, "11": -100}},
        {"temperature": 0.7, "logprobs": True, "top_logprobs": 20, "seed": 5},
        {"stop": ["\n\n", "zzz"], "user": "someone", "priority": "normal", "n": 1},
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ]
        },
    ],
    ids=lambda e: ",".join(sorted(e)),
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_valid_options_are_served(http: httpx.Client, extra: dict[str, Any], stream: bool) -> None:
    body = {"messages": HELLO, "max_tokens": 6, **extra}
    if stream:
        chunks = sse_chunks(http, "/v1/chat/completions", body)
        assert all("error" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        r = _chat(http, **body)
        assert r["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= r["usage"]["completion_tokens"] <= 6


def test_logit_bias_steers_greedy_output(http: httpx.Client) -> None:
    plain = _chat(http, max_tokens=4, logprobs=True)
    first = plain["choices"][0]["logprobs"]["content"][0]["token"]
    # Push a token that greedy decoding did not pick to the top: it is then picked every time.
    biased = _chat(http, max_tokens=4, logprobs=True, logit_bias={"300": 100})
    tokens = [e["token"] for e in biased["choices"][0]["logprobs"]["content"]]
    assert len(set(tokens)) == 1 and tokens[0] != first
