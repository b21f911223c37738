"""Bad requests: each is a 4xx OpenAI error object naming the field, and the server stays
healthy."""

from __future__ import annotations

import json
from typing import Any, Optional, Union

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(180)

MAX_BODY = 8192
CONTEXT = 256
APPLIANCE_OVERRIDES = (
    "logging.file=none",
    f"limits.max_body_bytes={MAX_BODY}",
    f"models.catalog.demo.context_length={CONTEXT}",
    "models.catalog.demo.max_tokens=16",
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(module_appliance: Any) -> Any:
    with httpx.Client(base_url=module_appliance.url, timeout=60) as c:
        yield c


def chat(**fields: Any) -> bytes:
    return json.dumps({"messages": MSGS, "max_tokens": 2, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"prompt": "hi", "max_tokens": 2, **fields}).encode()


def raw_chat(fragment: str) -> bytes:
    """A chat body with `fragment` (raw JSON text, maybe not valid JSON) as one more field."""
    return (
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + fragment + "}"
    ).encode()


LONG_PROMPT = " ".join(["river"] * (CONTEXT + 10))

# (id, path, body, status, param, code); code None: any code.
CASES: list[tuple[str, str, bytes, int, Optional[str], Optional[str]]] = [
    # -- not a JSON object
    ("malformed json", CHAT, b'{"messages": [', 400, None, None),
    ("empty body", CHAT, b"", 400, None, None),
    ("body is a list", CHAT, b"[1, 2]", 400, None, None),
    ("body is a string", CHAT, b'"hello"', 400, None, None),
    ("body is null", CHAT, b"null", 400, None, None),
    ("NaN literal", CHAT, raw_chat('"temperature": NaN'), 400, None, None),
    ("Infinity literal", CHAT, raw_chat('"temperature": Infinity'), 400, None, None),
    ("number overflows to inf", CHAT, raw_chat('"temperature": 1e999'), 400, None, None),
    (
        "invalid utf-8",
        CHAT,
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        None,
        None,
    ),
    ("lone surrogate", CHAT, raw_chat('"user": "\\ud800"'), 400, None, None),
    # -- messages
    ("messages missing", CHAT, json.dumps({"max_tokens": 2}).encode(), 400, "messages", None),
    ("messages empty", CHAT, chat(messages=[]), 400, "messages", None),
    ("messages a string", CHAT, chat(messages="hi"), 400, "messages", None),
    ("message not an object", CHAT, chat(messages=[5]), 400, "messages[0]", None),
    (
        "unknown role",
        CHAT,
        chat(messages=[{"role": "wizard", "content": "hi"}]),
        400,
        "messages[0].role",
        None,
    ),
    ("role missing", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role", None),
    (
        "content a number",
        CHAT,
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        None,
    ),
    ("content missing", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    (
        "content an image",
        CHAT,
        chat(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        ),
        400,
        "messages[0].content[0]",
        None,
    ),
    (
        "second message bad",
        CHAT,
        chat(messages=[*MSGS, {"role": "user", "content": {"a": 1}}]),
        400,
        "messages[1].content",
        None,
    ),
    # -- wrong types
    ("model a number", CHAT, chat(model=5), 400, "model", None),
    ("stream a string", CHAT, chat(stream="yes"), 400, "stream", None),
    ("max_tokens a string", CHAT, chat(max_tokens="10"), 400, "max_tokens", None),
    ("max_tokens a bool", CHAT, chat(max_tokens=True), 400, "max_tokens", None),
    ("max_tokens a float", CHAT, chat(max_tokens=2.5), 400, "max_tokens", None),
    ("temperature a string", CHAT, chat(temperature="hot"), 400, "temperature", None),
    ("top_p a list", CHAT, chat(top_p=[1]), 400, "top_p", None),
    ("stop a number", CHAT, chat(stop=5), 400, "stop", None),
    ("stop list of numbers", CHAT, chat(stop=[1, 2]), 400, "stop", None),
    ("stop empty string", CHAT, chat(stop=""), 400, "stop", None),
    ("stop too many", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("seed a string", CHAT, chat(seed="x"), 400, "seed", None),
    ("logprobs a string", CHAT, chat(logprobs="yes"), 400, "logprobs", None),
    (
        "stream_options a number",
        CHAT,
        chat(stream=True, stream_options=3),
        400,
        "stream_options",
        None,
    ),
    (
        "include_usage a string",
        CHAT,
        chat(stream=True, stream_options={"include_usage": "y"}),
        400,
        "stream_options.include_usage",
        None,
    ),
    ("user a number", CHAT, chat(user=5), 400, "user", None),
    ("logit_bias a list", CHAT, chat(logit_bias=[1]), 400, "logit_bias", None),
    ("logit_bias key not a token", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias", None),
    ("logit_bias value too big", CHAT, chat(logit_bias={"1": 500}), 400, "logit_bias", None),
    ("priority unknown", CHAT, chat(priority="urgent"), 400, "priority", None),
    # -- out of range
    ("max_tokens zero", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens negative", CHAT, chat(max_tokens=-1), 400, "max_tokens", None),
    ("max_tokens huge", CHAT, chat(max_tokens=10**12), 400, "max_tokens", None),
    (
        "max_tokens beyond 64 bits",
        CHAT,
        raw_chat('"max_tokens": 123456789012345678901234567890').replace(b'"max_tokens": 2, ', b""),
        400,
        "max_tokens",
        None,
    ),
    (
        "max_completion_tokens zero",
        CHAT,
        chat(max_completion_tokens=0),
        400,
        "max_completion_tokens",
        None,
    ),
    ("seed beyond 64 bits", CHAT, raw_chat('"seed": 1180591620717411303424'), 400, "seed", None),
    ("temperature negative", CHAT, chat(temperature=-0.5), 400, "temperature", None),
    ("temperature huge", CHAT, chat(temperature=1e308), 400, "temperature", None),
    ("top_p zero", CHAT, chat(top_p=0), 400, "top_p", None),
    ("top_p above one", CHAT, chat(top_p=1.5), 400, "top_p", None),
    ("top_k negative", CHAT, chat(top_k=-5), 400, "top_k", None),
    ("min_p above one", CHAT, chat(min_p=2), 400, "min_p", None),
    ("presence_penalty", CHAT, chat(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency_penalty", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty", None),
    ("repetition_penalty zero", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty", None),
    (
        "top_logprobs too many",
        CHAT,
        chat(logprobs=True, top_logprobs=50),
        400,
        "top_logprobs",
        None,
    ),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("n two", CHAT, chat(n=2), 400, "n", None),
    ("logit_bias out of vocabulary", CHAT, chat(logit_bias={"50000": 1}), 400, "logit_bias", None),
    # -- the model and the context
    ("unknown model", CHAT, chat(model="gpt-17"), 404, "model", "model_not_found"),
    (
        "prompt longer than context",
        CHAT,
        chat(messages=[{"role": "user", "content": LONG_PROMPT}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "completion prompt longer than context",
        COMPLETIONS,
        completion(prompt=LONG_PROMPT),
        400,
        "prompt",
        "context_length_exceeded",
    ),
    # -- completions
    ("prompt missing", COMPLETIONS, json.dumps({"max_tokens": 2}).encode(), 400, "prompt", None),
    ("prompt a number", COMPLETIONS, completion(prompt=5), 400, "prompt", None),
    ("prompt empty", COMPLETIONS, completion(prompt=""), 400, "prompt", None),
    ("prompt empty list", COMPLETIONS, completion(prompt=[]), 400, "prompt", None),
    ("prompt negative token", COMPLETIONS, completion(prompt=[1, -1]), 400, "prompt", None),
    (
        "prompt token out of vocabulary",
        COMPLETIONS,
        completion(prompt=[1, 99999]),
        400,
        "prompt",
        None,
    ),
    ("several prompts", COMPLETIONS, completion(prompt=["a", "b"]), 400, "prompt", None),
    ("echo a string", COMPLETIONS, completion(echo="x"), 400, "echo", None),
    ("logprobs a bool", COMPLETIONS, completion(logprobs=True), 400, "logprobs", None),
    ("logprobs too many", COMPLETIONS, completion(logprobs=50), 400, "logprobs", None),
    ("suffix", COMPLETIONS, completion(suffix="x"), 400, "suffix", None),
    ("completions n two", COMPLETIONS, completion(n=2), 400, "n", None),
    (
        "completions unknown model",
        COMPLETIONS,
        completion(model="nope"),
        404,
        "model",
        "model_not_found",
    ),
    # -- size
    (
        "body too large",
        CHAT,
        chat(messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}]),
        413,
        None,
        "request_too_large",
    ),
]


def assert_error(r: httpx.Response, status: int, param: Optional[str], code: Optional[str]) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    assert isinstance(err["type"], str) and isinstance(err["code"], str)
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request(
    http: httpx.Client,
    path: str,
    body: bytes,
    status: int,
    param: Optional[str],
    code: Optional[str],
) -> None:
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(r, status, param, code)
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_bad_request_with_stream_is_a_plain_error(http: httpx.Client, stream: bool) -> None:
    """An error found before the stream starts is a JSON error, not an event stream."""
    r = http.post(CHAT, content=chat(stream=stream, temperature=9))
    assert_error(r, 400, "temperature", None)


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.post("/v1/nothing", content=chat()), 404, None, "not_found")
    r = http.get(CHAT)
    assert 400 <= r.status_code < 500
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_oversize_body_without_content_length(http: httpx.Client) -> None:
    """A chunked body (no Content-Length) past the limit is refused as well."""
    big = chat(messages=[{"role": "user", "content": "y" * (MAX_BODY * 2)}])

    def chunks() -> Any:
        for i in range(0, len(big), 1024):
            yield big[i : i + 1024]

    r = http.post(CHAT, content=chunks())
    assert_error(r, 413, None, "request_too_large")


def test_still_healthy_after_bad_input(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    r = http.post(CHAT, content=chat())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    r = http.post(COMPLETIONS, content=completion(prompt=[1, 2, 3]))
    assert r.status_code == 200, r.text


# -- fuzzing ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard", ""])
content = (
    st.text(max_size=40)
    | st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}
        ),
        max_size=2,
    )
    | json_values
)
message = st.fixed_dictionaries({}, optional={"role": roles | json_values, "content": content})
small = st.integers(-2, 6) | json_values
chat_body = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=3) | json_values, "max_tokens": small},
    optional={
        "model": st.just("demo") | json_values,
        "max_completion_tokens": small,
        "temperature": st.floats(-1, 3) | json_values,
        "top_p": st.floats(-1, 2) | json_values,
        "top_k": st.integers(-3, 50) | json_values,
        "seed": st.integers() | json_values,
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
        "logprobs": st.booleans() | json_values,
        "top_logprobs": st.integers(-1, 25) | json_values,
        "logit_bias": st.dictionaries(
            st.integers(-5, 2000).map(str), st.floats(-150, 150), max_size=3
        )
        | json_values,
        "n": st.integers(0, 3) | json_values,
        "presence_penalty": st.floats(-3, 3) | json_values,
        "frequency_penalty": st.floats(-3, 3) | json_values,
        "repetition_penalty": st.floats(-1, 3) | json_values,
        "user": st.text(max_size=5) | json_values,
        "priority": st.sampled_from(["normal", "high", "low"]) | json_values,
    },
)


def _check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        datas = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert datas[-1] == "[DONE]"
        assert all("error" not in json.loads(d) for d in datas[:-1]), r.text
    else:
        assert r.json()["object"] == "chat.completion"


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=chat_body)
def test_fuzz_chat_body_never_5xx(http: httpx.Client, body: dict[str, Any]) -> None:
    _check_answer(http.post(CHAT, content=json.dumps(body).encode()))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    raw=st.binary(max_size=200)
    | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))
)
def test_fuzz_raw_bytes_never_5xx(http: httpx.Client, raw: Union[bytes, str]) -> None:
    r = http.post(CHAT, content=raw)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_healthy_after_fuzzing(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.post(CHAT, content=chat()).status_code == 200
