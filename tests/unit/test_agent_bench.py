"""The agent scenario's pure parts: the conversations it grows, its schedule, the reusable
prefix and the ITL windows, and the report it writes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from matplotlib.image import imread

from benchmarks.agent import (
    AGENT_TEMPLATE,
    SHAPES,
    TOOLS,
    Conversation,
    TurnResult,
    followers,
    hit_ratio,
    long_session,
    longest_prompt,
    render_text,
    reusable_prefix,
    split_gaps,
    token_gaps,
    tool_list,
    turn_kind,
)
from benchmarks.agent_report import agent_tables, server_summary, summarize
from benchmarks.agent_report import main as report_main

SHAPE = replace(SHAPES["demo"], sessions=3, turns=5)
ROOT = Path(__file__).resolve().parents[2]


def _grow(shape=SHAPE, session: int = 0, seed: int = 0) -> list[list[dict]]:
    conv = Conversation(shape, session, seed)
    seen = []
    for t in range(shape.turns):
        conv.add_turn(t, long_session(t, shape.sessions) == session)
        seen.append(json.loads(json.dumps(conv.messages)))
        conv.record_answer(f"answer {t} of session {session}")
    return seen


def test_twelve_tools_with_and_without_descriptions() -> None:
    full, bare = tool_list(True), tool_list(False)
    names = [t["function"]["name"] for t in full]
    assert len(TOOLS) == 12 and len(set(names)) == 12
    assert all(t["function"]["parameters"]["type"] == "object" for t in full)
    assert "description" in json.dumps(full) and "description" not in json.dumps(bare)
    assert [t["function"]["name"] for t in bare] == names
    full[0]["function"]["name"] = "changed"  # a copy: the shared list stays as it was
    assert tool_list(True)[0]["function"]["name"] == "read_file"


def test_each_turn_extends_the_conversation_with_the_answer_and_new_content() -> None:
    turns = _grow(session=1)
    assert [m["role"] for m in turns[0]] == ["system", "user"]
    for t in range(1, len(turns)):
        prev, now = turns[t - 1], turns[t]
        assert now[: len(prev)] == prev  # the whole history resent, unchanged
        answer, new = now[len(prev)], now[len(prev) + 1 :]
        assert answer["role"] == "assistant" and answer["content"] == f"answer {t - 1} of session 1"
        assert len(new) == 1
        if turn_kind(t) == "tool":
            (call,) = answer["tool_calls"]
            assert new[0]["role"] == "tool" and new[0]["tool_call_id"] == call["id"]
            assert json.loads(call["function"]["arguments"])  # arguments: a JSON object
        else:
            assert "tool_calls" not in answer and new[0]["role"] == "user"
    # Session 1 brings the long content in turn index 2: that turn grows the most.
    growth = [len(json.dumps(turns[t])) - len(json.dumps(turns[t - 1])) for t in range(1, 5)]
    assert growth.index(max(growth)) == 1 and max(growth) > 3 * min(growth)


def test_content_is_deterministic_and_the_system_prompt_shared() -> None:
    assert _grow(session=0, seed=3) == _grow(session=0, seed=3)
    a, b = _grow(session=0)[-1], _grow(session=2)[-1]
    assert a[0] == b[0]  # one system prompt for every session
    assert a[1] != b[1]
    assert _grow(session=0, seed=1)[0][1] != a[1]


def test_schedule_gives_every_session_a_long_turn() -> None:
    assert long_session(0, 4) is None and followers(0, 4) == {1, 2, 3}
    assert [long_session(r, 4) for r in range(1, 6)] == [0, 1, 2, 3, 0]
    assert followers(3, 4) == {2}
    assert followers(0, 1) == frozenset() and followers(2, 1) == frozenset()


def test_render_text_is_what_the_template_renders() -> None:
    # As chat templates are rendered: trim_blocks, lstrip_blocks, a tojson without escaping.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined
    )
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    messages = _grow()[-1]
    for m in messages:  # as both servers hand them to the template: arguments parsed
        for c in m.get("tool_calls") or ():
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    tools = tool_list(False)
    want = env.from_string(AGENT_TEMPLATE).render(
        messages=messages, tools=tools, bos_token="<s>", add_generation_prompt=True
    )
    assert render_text(_grow()[-1], tools, "<s>") == want
    assert "<tool_call>" in want and '"name": "grep"' in want or '"name": "read_file"' in want


def test_longest_prompt_counts_the_longest_session() -> None:
    words = longest_prompt(SHAPE, lambda text: len(text.split()), "a b c")
    bigger = longest_prompt(
        replace(SHAPE, long_chars=SHAPE.long_chars * 3), lambda t: len(t.split()), "a b c"
    )
    assert 0 < words < bigger


def test_reusable_prefix_and_hit_ratio() -> None:
    assert reusable_prefix(1000, 32, 1400) == 1032
    assert reusable_prefix(1000, 32, 1010) == 1010  # never more than the prompt
    assert hit_ratio(990, 1032) == pytest.approx(990 / 1032)
    assert hit_ratio(0, 0) is None


def test_gaps_split_by_the_long_prefill_window() -> None:
    # 6 tokens in 3 events: 2 a event, each gap shared by 2 tokens.
    assert [g for _, _, g in token_gaps([0.0, 1.0, 3.0], 6)] == [0.5, 1.0]
    assert token_gaps([0.0], 1) == []
    gaps = token_gaps([0.0, 0.01, 0.02, 0.52, 0.53], 5)
    inside, steady = split_gaps(gaps, [(0.1, 0.4)])
    # The stall (0.02 -> 0.52) spans the whole window: it counts, whole.
    assert inside == pytest.approx([0.5]) and steady == pytest.approx([0.01, 0.01, 0.01])
    assert split_gaps(gaps, []) == ([], [g for _, _, g in gaps])


def _result(session: int, turn: int, sent: float, ttft: float, **kw) -> TurnResult:
    times = [sent + ttft + 0.01 * i for i in range(4)]
    base = dict(
        server="x",
        session=session,
        turn=turn,
        long=False,
        ok=True,
        error=None,
        sent=sent,
        first=times[0],
        end=times[-1],
        times=times,
        prompt_tokens=1000 + 200 * turn,
        completion_tokens=4,
        cached_tokens=0 if turn == 0 else 1000 + 200 * (turn - 1),
        text="a b c d",
    )
    base.update(kw)
    return TurnResult(**base)


def _two_servers() -> dict:
    res = {}
    for name, ttft in (("mlx_lm.server", 0.4), ("appliance", 0.1)):
        rows = [_result(s, t, 10.0 * t, ttft) for s in (0, 1) for t in range(3)]
        # In turn 2 session 1 is long; session 0 stalls 0.3 s while it prefills.
        rows[1] = _result(0, 1, 10.0, ttft, times=[10.1, 10.11, 10.41, 10.42])
        rows[4] = _result(1, 1, 10.12, ttft, long=True)
        res[name] = rows
    return {"results": res, "wall_s": {"mlx_lm.server": 2.0, "appliance": 1.0}}


def test_server_summary_figures() -> None:
    raw = _two_servers()
    s = server_summary(raw["results"]["appliance"], 1.0, 3)
    t2 = s["turns"][1]
    assert t2["turn"] == 2 and t2["requests"] == 2 and t2["errors"] == 0
    assert t2["reusable_tokens_mean"] == 1004  # 1000 prompt + 4 answer, previous turn
    assert t2["hit_ratio"] == pytest.approx(1000 / 1004)
    assert s["turns"][0]["hit_ratio"] is None
    assert s["tokens"] == 24 and s["tokens_per_s"] == 24.0
    assert s["ttft_s_p50_turns_ge2"] == pytest.approx(0.1)
    assert s["itl_during_long_prefill_n"] == 1
    assert s["itl_s_during_long_prefill_p99"] == pytest.approx(0.3)
    assert s["stall_ratio"] == pytest.approx(0.3 / 0.01)


def test_tables_and_chart(tmp_path: Path) -> None:
    raw = _two_servers()
    shape = replace(SHAPE, sessions=2, turns=3)
    res = {
        "plan": {"model_label": "demo model"},
        "machine": {"cpu": "x86", "cores": 2, "versions": {"mlx": "0", "mlx-lm": "0"}},
        "agent": summarize(raw, shape, 1234),
    }
    ag = res["agent"]
    assert ag["ratios"]["ttft_p50_turns_ge2"] == pytest.approx(0.25)
    assert ag["ratios"]["tokens_per_s"] == pytest.approx(2.0)
    assert {r["session"] for r in ag["requests"]["appliance"]} == {1, 2}
    text = agent_tables(res)
    assert "| 2 | appliance | 1200 | 1000 | 1004 | 1.00 | 100.0 | 100.0 |" in text
    assert "| TTFT p50, turns >= 2 (ms) | 400.0 | 100.0 | 0.25x |" in text
    assert "| aggregate tokens/s | 12.0 | 24.0 | 2.00x |" in text
    assert "| TTFT p50 turns >= 2, appliance / mlx_lm.server | 0.25 | <= 0.5x | PASS |" in text
    assert "stall ratio" in text and "FAIL" in text  # a 30x stall fails its target
    src = tmp_path / "agent.json"
    src.write_text(json.dumps(res, default=str))
    png = tmp_path / "agent.png"
    assert report_main([str(src), str(png)]) == 0
    assert imread(png).shape[1] == 1100  # two panels, 10 inches at 110 dpi


@pytest.mark.parametrize(
    "figures",
    sorted((ROOT / "docs" / "performance" / "agent").glob("*.json")),
    ids=lambda p: p.name,
)
def test_the_documented_agent_figures_render(figures: Path, tmp_path: Path) -> None:
    png = tmp_path / "chart.png"
    assert report_main([str(figures), str(png)]) == 0
    assert png.stat().st_size > 10_000
