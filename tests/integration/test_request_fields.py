"""Every field of the openai SDK's chat and completions requests is honoured or refused.

The field lists come from the installed SDK's own request types, so a field the SDK adds fails
here until it has either a test of its effect (EFFECTS) or a 400 that names it (REFUSED).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

pytestmark = pytest.mark.timeout(240)

# A second demo entry whose template shows the reasoning switches it receives.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if reasoning_effort is defined %}effort {{ reasoning_effort }}\n{% endif %}"
    "{% if enable_thinking is defined and enable_thinking %}think step by step\n{% endif %}"
    "{% if tools %}tools {{ tools | length }}\n{% endif %}assistant:"
)


@pytest.fixture(scope="module")
def url(
    module_appliance_factory: Any, tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path
) -> str:
    from mlx_lm.utils import load_tokenizer

    DEMO_TOKENIZER[:] = [load_tokenizer(demo_model_dir)]
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    a = module_appliance_factory(
        "logging.file=none",
        "+models.catalog.templ.path=builtin:demo",
        f"+models.catalog.templ.chat_template={template}",
        "models.auto_load=[demo,templ]",
    )
    return str(a.url)


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


MSG = [{"role": "user", "content": "Tell me about the sea and the boats."}]


def chat(url: str, **fields: Any) -> dict[str, Any]:
    r = post(
        url, "/v1/chat/completions", {"model": "demo", "messages": MSG, "max_tokens": 16, **fields}
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def text_of(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"] or "")


def prompt_tokens(url: str, **fields: Any) -> int:
    body = {"model": "templ", "max_tokens": 1, **fields}
    body.setdefault("messages", MSG)
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


def accepted(path: str, field: str, good: Any, bad: Any) -> Callable[[str], None]:
    """A field the appliance takes and validates, with no effect on the output (documented)."""

    def check(url: str) -> None:
        base = {"model": "demo", "max_tokens": 2}
        base.update({"messages": MSG} if "chat" in path else {"prompt": "hi"})
        assert post(url, path, {**base, field: good}).status_code == 200
        r = post(url, path, {**base, field: bad})
        assert r.status_code == 400 and field in (r.json()["error"]["param"] or ""), r.text

    return check


# -- chat: the effect of each honoured field


def _max_tokens(url: str) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        a = chat(url, **{field: 3, "max_tokens": None} if field != "max_tokens" else {field: 3})
        assert a["usage"]["completion_tokens"] == 3 and a["choices"][0]["finish_reason"] == "length"


def _sampling(url: str) -> None:
    greedy = text_of(chat(url))
    hot = [text_of(chat(url, temperature=2.0, seed=s)) for s in (1, 2)]
    assert greedy not in hot and hot[0] != hot[1]  # temperature and seed both act
    assert text_of(chat(url, temperature=2.0, seed=1)) == hot[0]  # a seed repeats
    assert text_of(chat(url, temperature=2.0, seed=1, top_p=1e-9)) == greedy  # top_p: 1 token


def _stop(url: str) -> None:
    greedy = text_of(chat(url))
    stop = greedy[6:9]
    cut = chat(url, stop=[stop])
    assert text_of(cut) == greedy[: greedy.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def _penalties(url: str) -> None:
    greedy = chat(url, max_tokens=40)
    for field in ("presence_penalty", "frequency_penalty"):
        assert text_of(chat(url, max_tokens=40, **{field: 2.0})) != text_of(greedy), field


def _logit_bias(url: str) -> None:
    first = chat(url, max_tokens=1, logprobs=True)["choices"][0]["logprobs"]["content"][0]
    token = first["token"]
    ids = DEMO_TOKENIZER[0].encode(token, add_special_tokens=False)
    assert len(ids) == 1, (token, ids)
    banned = chat(url, max_tokens=1, logprobs=True, logit_bias={str(ids[0]): -100})
    assert banned["choices"][0]["logprobs"]["content"][0]["token"] != token


DEMO_TOKENIZER: list[Any] = []  # the demo model's tokenizer, set by the fixture


def _logprobs(url: str) -> None:
    a = chat(url, max_tokens=4, logprobs=True, top_logprobs=3)
    content = a["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)


def _stream(url: str) -> None:
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        timeout=60,
        json={
            "model": "demo",
            "messages": MSG,
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4


def _model(url: str) -> None:
    assert chat(url)["model"] == "demo"
    r = post(url, "/v1/chat/completions", {"model": "nope", "messages": MSG})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def _messages(url: str) -> None:
    one = prompt_tokens(url)
    two = prompt_tokens(url, messages=[{"role": "system", "content": "Be brief."}, *MSG])
    assert two > one


def _reasoning(url: str) -> None:
    plain = prompt_tokens(url)
    assert prompt_tokens(url, reasoning_effort="high") > plain  # "effort high" in the prompt
    assert prompt_tokens(url, chat_template_kwargs={"enable_thinking": True}) > plain


TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "required": ["a"],
        },
    },
}


def _tools(url: str) -> None:
    assert prompt_tokens(url, tools=[TOOL]) > prompt_tokens(url)  # the tools reach the template
    a = chat(url, tools=[TOOL], tool_choice="required", max_tokens=60)
    assert a["choices"][0]["finish_reason"] == "tool_calls"
    none = chat(url, tools=[TOOL], tool_choice="none", max_tokens=4)
    assert "tool_calls" not in none["choices"][0]["message"]


def _parallel(url: str) -> None:
    a = chat(url, tools=[TOOL], tool_choice="required", parallel_tool_calls=False, max_tokens=120)
    assert len(a["choices"][0]["message"]["tool_calls"]) == 1


def _functions(url: str) -> None:
    fn = TOOL["function"]
    a = chat(url, functions=[fn], function_call={"name": "f"}, max_tokens=60)
    choice = a["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert json.loads(choice["message"]["function_call"]["arguments"])["a"] is not None


def _response_format(url: str) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    a = chat(
        url,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": schema, "strict": True},
        },
    )
    assert isinstance(json.loads(text_of(a))["n"], int)


def _n(url: str) -> None:
    assert chat(url, n=1)["choices"][0]["index"] == 0
    r = post(url, "/v1/chat/completions", {"messages": MSG, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


C = "/v1/chat/completions"
EFFECTS: dict[str, Callable[[str], None]] = {
    "messages": _messages,
    "model": _model,
    "max_tokens": _max_tokens,
    "max_completion_tokens": _max_tokens,
    "temperature": _sampling,
    "top_p": _sampling,
    "seed": _sampling,
    "stop": _stop,
    "presence_penalty": _penalties,
    "frequency_penalty": _penalties,
    "logit_bias": _logit_bias,
    "logprobs": _logprobs,
    "top_logprobs": _logprobs,
    "stream": _stream,
    "stream_options": _stream,
    "n": _n,
    "reasoning_effort": _reasoning,
    "tools": _tools,
    "tool_choice": _tools,
    "parallel_tool_calls": _parallel,
    "functions": _functions,
    "function_call": _functions,
    "response_format": _response_format,
    # Accepted and checked, no effect on the answer (docs/api.md): metadata for the caller,
    # cache hints (the prompt cache is automatic), one service tier, no stored completions.
    "user": accepted(C, "user", "alice", 5),
    "metadata": accepted(C, "metadata", {"team": "a"}, {"k": 5}),
    "safety_identifier": accepted(C, "safety_identifier", "h1", 5),
    "prompt_cache_key": accepted(C, "prompt_cache_key", "session-1", 5),
    "prompt_cache_options": accepted(C, "prompt_cache_options", {}, 5),
    "prompt_cache_retention": accepted(C, "prompt_cache_retention", "24h", "forever"),
    "service_tier": accepted(C, "service_tier", "auto", "priority"),
    "store": accepted(C, "store", False, True),
    "modalities": accepted(C, "modalities", ["text"], ["text", "audio"]),
}
REFUSED: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "mp3"},
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "verbosity": "low",
    "moderation": {"enabled": True},
}


def _sdk_fields(module: Any) -> list[str]:
    return sorted({*typing.get_type_hints(module.CompletionCreateParamsBase), "stream"})


@pytest.mark.parametrize("field", _sdk_fields(chat_params))
def test_every_chat_field_is_honoured_or_refused(url: str, field: str) -> None:
    if field in REFUSED:
        r = post(url, C, {"messages": MSG, field: REFUSED[field]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field and "not supported" in err["message"]
        return
    assert field in EFFECTS, f"{field} has neither a test of its effect nor a 400"
    EFFECTS[field](url)


def _echo(url: str) -> None:
    r = post(
        url,
        "/v1/completions",
        {"model": "demo", "prompt": "Once upon", "max_tokens": 2, "echo": True},
    )
    assert r.json()["choices"][0]["text"].startswith("Once upon")


def _completion_basics(url: str) -> None:
    r = post(
        url,
        "/v1/completions",
        {
            "model": "demo",
            "prompt": "Once upon",
            "max_tokens": 3,
            "logprobs": 2,
            "seed": 3,
            "temperature": 1.0,
            "stop": ["\n\n\n"],
            "top_p": 0.9,
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["usage"]["completion_tokens"] <= 3
    assert len(body["choices"][0]["logprobs"]["top_logprobs"][0]) == 2


P = "/v1/completions"
COMPLETION_EFFECTS: dict[str, Callable[[str], None]] = {
    "prompt": _completion_basics,
    "model": _completion_basics,
    "max_tokens": _completion_basics,
    "logprobs": _completion_basics,
    "seed": _completion_basics,
    "temperature": _completion_basics,
    "stop": _completion_basics,
    "top_p": _completion_basics,
    "echo": _echo,
    "frequency_penalty": accepted(P, "frequency_penalty", 0.5, 5),
    "presence_penalty": accepted(P, "presence_penalty", 0.5, 5),
    "logit_bias": accepted(P, "logit_bias", {"3": -1}, {"x": 1}),
    "n": accepted(P, "n", 1, 2),
    "best_of": accepted(P, "best_of", 1, 2),
    "stream": accepted(P, "stream", False, "yes"),
    "stream_options": accepted(P, "stream_options", {"include_usage": True}, 5),
    "user": accepted(P, "user", "alice", 5),
}
COMPLETION_REFUSED = {"suffix": "end"}


@pytest.mark.parametrize("field", _sdk_fields(completion_params))
def test_every_completions_field_is_honoured_or_refused(url: str, field: str) -> None:
    if field in COMPLETION_REFUSED:
        r = post(url, P, {"prompt": "hi", field: COMPLETION_REFUSED[field]})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        return
    assert field in COMPLETION_EFFECTS, f"{field} has neither a test of its effect nor a 400"
    COMPLETION_EFFECTS[field](url)


def test_an_unknown_field_gets_openais_400(url: str) -> None:
    r = post(url, C, {"messages": MSG, "temprature": 0.5})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "temprature"
    assert err["message"] == "Unrecognized request argument supplied: temprature"


def test_the_template_file_is_the_models(url: str, tmp_path: Path) -> None:
    assert prompt_tokens(url) < 40  # the short template above, not the demo model's own
