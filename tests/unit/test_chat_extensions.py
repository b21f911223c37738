"""engine/chat.py's generic knobs the Anthropic and Responses front-ends need, on the thinking
test model's tokenizer (no model load): a thinking budget forces the end marker, a prefill is
continued rather than answered, aliases resolve names."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.engine import constraints as C
from appliance.engine.chat import ChatRequest, prepare
from appliance.engine.output.prompt import Message
from appliance.engine.registry import resolve_alias
from appliance.engine.types import SamplingParams
from tests.thinker import END_THINK, build_thinker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def thinker_tok(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(build_thinker(demo_model_dir, tmp_path_factory.mktemp("thinker")))


def _worker(tok: Any) -> Any:
    return SimpleNamespace(tokenizer=tok)


def _request(**kw: Any) -> ChatRequest:
    base: dict[str, Any] = {
        "model": None,
        "params": SamplingParams(),
        "messages": (Message("user", "hi"),),
    }
    base.update(kw)
    return ChatRequest(**base)


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok._tokenizer.encode(text, add_special_tokens=False))


def test_a_thinking_budget_forces_the_end_marker(thinker_tok: Any) -> None:
    p = prepare(_worker(thinker_tok), _request(reasoning=True, reasoning_budget=3))
    assert p.reasoning is not None and p.reasoning.started  # the prompt opened thinking
    constraint = p.params.constraint
    assert constraint is not None and constraint.param == "reasoning_budget"
    m = C.TokenizerBridge.for_tokenizer(thinker_tok).matcher(constraint.grammar)
    end = thinker_tok.convert_tokens_to_ids(END_THINK)
    thought = _ids(thinker_tok, "one two three four five")
    assert len(thought) > 3
    for t in thought[:3]:
        assert m.consume_token(t), m.get_error()
    # Three tokens of thinking spent: only the end marker may follow.
    assert not m.consume_token(thought[3])
    m = C.TokenizerBridge.for_tokenizer(thinker_tok).matcher(constraint.grammar)
    assert m.try_consume_tokens(thought[:3]) == 3
    assert m.consume_token(end), m.get_error()
    answer = _ids(thinker_tok, "\n\nan answer of any length at all")
    assert m.try_consume_tokens(answer) == len(answer)


def test_thinking_under_the_budget_ends_when_the_model_says(thinker_tok: Any) -> None:
    p = prepare(_worker(thinker_tok), _request(reasoning=True, reasoning_budget=50))
    assert p.params.constraint is not None
    m = C.TokenizerBridge.for_tokenizer(thinker_tok).matcher(p.params.constraint.grammar)
    end = thinker_tok.convert_tokens_to_ids(END_THINK)
    ids = [*_ids(thinker_tok, "short"), end, *_ids(thinker_tok, "done")]
    assert m.try_consume_tokens(ids) == len(ids)


@pytest.mark.parametrize(
    ("budget", "max_tokens", "reasoning"),
    [(None, None, True), (100, 100, True), (100, 50, True), (5, None, None)],
)
def test_no_budget_grammar_where_it_cannot_bind(
    thinker_tok: Any, budget: Any, max_tokens: Any, reasoning: Any
) -> None:
    # No budget; one at or past max_tokens; a model told nothing of thinking still opens it
    # in this template (so the last case does build one).
    p = prepare(
        _worker(thinker_tok),
        _request(reasoning=reasoning, reasoning_budget=budget, max_tokens=max_tokens),
    )
    expect = budget is not None and (max_tokens is None or budget < max_tokens)
    assert (p.params.constraint is not None) == expect


def test_the_budget_follows_the_model_cap(thinker_tok: Any) -> None:
    req = _request(reasoning=True, reasoning_budget=600, max_tokens=32000)
    assert prepare(_worker(thinker_tok), req, max_tokens=512).params.constraint is None
    assert prepare(_worker(thinker_tok), req, max_tokens=2048).params.constraint is not None


def test_a_prefill_is_continued(thinker_tok: Any) -> None:
    msgs = (Message("user", "Capital of France?"), Message("assistant", "The capital is"))
    open_ = prepare(_worker(thinker_tok), _request(messages=msgs, continue_final=True))
    text = thinker_tok.decode(open_.prompt)
    assert text.endswith("The capital is"), text[-40:]
    closed = prepare(_worker(thinker_tok), _request(messages=msgs))
    assert thinker_tok.decode(closed.prompt).rstrip().endswith("<think>")


def test_count_only_renders(thinker_tok: Any) -> None:
    from appliance.engine.chat import Tool, ToolChoice
    from appliance.engine.output.prompt import ToolSpec

    tool = Tool(ToolSpec("f", "", {"type": "object", "properties": {}}))
    req = _request(tools=(tool,), tool_choice=ToolChoice("required"))
    assert prepare(_worker(thinker_tok), req, constrain=False).params.constraint is None
    assert prepare(_worker(thinker_tok), req).params.constraint is not None


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("claude-sonnet-4-5", "big"),
        ("claude-haiku-4-5", "small"),
        ("gpt-5-codex", "big"),
        ("gpt-4o", None),
        ("exact", "small"),
    ],
)
def test_aliases(name: str, target: Any) -> None:
    aliases = {"claude-haiku-*": "small", "claude-*": "big", "gpt-5*": "big", "exact": "small"}
    assert resolve_alias(aliases, name) == target
