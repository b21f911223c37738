"""Family detection from the catalog's name, the checkpoint's declaration, the chat template and
the vocabulary; thinking markers and whether the prompt opened thinking."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.engine.output import (
    GLM,
    HARMONY,
    HERMES,
    LLAMA3,
    MISTRAL,
    QWEN3_CODER,
    Family,
    ReasoningMode,
    detect_family,
    family_by_name,
    reasoning_mode,
)
from appliance.errors import InvalidRequest

from ._output_util import hf_tokenizer


@pytest.mark.parametrize(
    "name,family",
    [
        ("hermes", HERMES),
        ("json_tools", HERMES),
        ("qwen3_coder", QWEN3_CODER),
        ("glm47", GLM),
        ("laguna", GLM),
        ("GLM", GLM),
        ("llama3_json", LLAMA3),
        ("mistral", MISTRAL),
        ("gpt-oss", HARMONY),
        ("harmony", HARMONY),
        ("pythonic", Family("mlx_lm:pythonic", mlx_parser="pythonic")),
        ("mlx_lm:kimi_k2", Family("mlx_lm:kimi_k2", mlx_parser="kimi_k2")),
        ("none", None),
    ],
)
def test_family_by_name(name: str, family: object) -> None:
    assert family_by_name(name) == family


def test_unknown_name_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as err:
        family_by_name("telepathy")
    assert err.value.param == "tool_parser"


@pytest.mark.parametrize(
    "template,family",
    [
        (
            "{% for t in tools %}{{ t }}{% endfor %}<tool_call>{{ tool_call.name }}</tool_call>",
            HERMES,
        ),
        ("{{ tools }}<tool_call>\n<function={{ name }}>\n<parameter=", QWEN3_CODER),
        ("{{ tools }}<tool_call>{{ name }}<arg_key>{{ k }}</arg_key>", GLM),
        ("{{ tools }}[TOOL_CALLS]{{ name }}[ARGS]", MISTRAL),
        ("<|start_header_id|>ipython<|end_header_id|>{{ tools }}<|python_tag|>", LLAMA3),
        ('<|start_header_id|>{{ tools }} {"name": function name, "parameters": ...}', LLAMA3),
        ("<|start|>{{ m }}<|channel|>final<|message|>", HARMONY),
        (
            "{{ tools }}<|tool_call_start|>[f(x=1)]<|tool_call_end|>",
            Family("mlx_lm:pythonic", "pythonic"),
        ),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", HERMES),  # no tools: the fallback
        ("{% if tools %}<functions>{{ tools }}</functions> call a function{% endif %}", None),
    ],
)
def test_detect_from_template(template: str, family: object) -> None:
    assert detect_family(hf_tokenizer(template)) == family


def test_override_and_declared_parser_win() -> None:
    tok = hf_tokenizer("{{ tools }}<tool_call>{{ tool_call.name }}</tool_call>")
    assert detect_family(tok, "qwen3_coder") == QWEN3_CODER
    assert detect_family(tok, "none") is None
    tok.init_kwargs["tool_parser_type"] = "glm47"
    assert detect_family(tok) == GLM


def test_detect_from_vocabulary() -> None:
    tok = hf_tokenizer("{{ messages }}", special=["<|channel|>", "<|constrain|>"])
    assert detect_family(tok) == HARMONY


def test_demo_model_is_hermes_through_the_fallback() -> None:
    from mlx_lm.tokenizer_utils import load

    from appliance.engine.demo import ensure_demo_model

    tok = load(Path(ensure_demo_model(None)))
    assert detect_family(tok) == HERMES
    assert reasoning_mode(tok) is None


def test_reasoning_mode_and_an_opened_prompt() -> None:
    tok = hf_tokenizer("{{ messages }}", added=["<think>", "</think>"])
    assert reasoning_mode(tok) == ReasoningMode("<think>", "</think>", started=False)
    opened = tok.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    assert reasoning_mode(tok, opened) == ReasoningMode(started=True)
    closed = tok.encode("assistant\n<think>\n\n</think>\n\n", add_special_tokens=False)
    assert reasoning_mode(tok, closed) == ReasoningMode(started=False)
    assert reasoning_mode(hf_tokenizer("x")) is None
