"""The agent scenario runs end to end on a tiny setting, against both servers, and writes its
JSON and chart.

No timing assertions: every figure is there and holds a number, and what the scenario is built
on holds (each turn's prompt grows, the cached tokens never exceed it). The real
mlx_lm.server and appliance run on loopback ports; the demo model comes from demo_cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from benchmarks.agent import SHAPES, longest_prompt
from benchmarks.agent_report import main as report_main

from .test_bench import bench_env


def test_demo_shape_fits_the_demo_models_context(demo_model_dir: Path) -> None:
    tok = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))
    config = json.loads((demo_model_dir / "config.json").read_text())
    shape = SHAPES["demo"]
    answer = " ".join(["word"] * shape.max_tokens)
    longest = longest_prompt(shape, lambda text: len(tok.encode(text).ids), answer)
    assert longest + shape.max_tokens <= shape.context_length <= config["max_position_embeddings"]
    # Not tiny either: the conversations grow to most of the context.
    assert longest > shape.context_length * 0.6


@pytest.mark.timeout(300)
def test_agent_scenario_end_to_end(tmp_path: Path, demo_cache: Path) -> None:
    out = tmp_path / "results"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = bench_env(demo_cache, scratch)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--agent",
            "--agent-sessions",
            "2",
            "--agent-turns",
            "3",
            "--max-tokens",
            "8",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=290,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    assert "agent turn 3/3 appliance" in proc.stderr
    assert "| TTFT p50, turns >= 2 (ms) |" in proc.stdout

    (json_path,) = out.glob("bench-agent-*.json")
    res = json.loads(json_path.read_text())
    ag = res["agent"]
    assert ag["shape"]["sessions"] == 2 and ag["shape"]["turns"] == 3
    assert ag["shape"]["max_tokens"] == 8
    assert set(ag["servers"]) == {"appliance", "mlx_lm.server"}
    for name, s in ag["servers"].items():
        assert s["errors"] == 0, (name, s["error_samples"])
        assert s["requests"] == 6 and s["tokens"] > 0
        assert s["cached_tokens_reported"], name
        for key in ("tokens_per_s", "ttft_s_p50_turns_ge2", "itl_s_steady_p50"):
            assert isinstance(s[key], float) and s[key] > 0, (name, key)
        assert [row["turn"] for row in s["turns"]] == [1, 2, 3]
        by = {(r["session"], r["turn"]): r for r in ag["requests"][name]}
        for (session, turn), r in by.items():
            assert r["cached_tokens"] <= r["prompt_tokens"]
            if turn > 1:  # the whole conversation resent, plus the answer and new content
                assert r["prompt_tokens"] > by[(session, turn - 1)]["prompt_tokens"]
        # The long session of turn 2 is session 1, of turn 3 session 2.
        assert [r["session"] for r in ag["requests"][name] if r["long"]] == [1, 2]
    assert set(ag["ratios"]) == {
        "ttft_p50_turns_ge2",
        "tokens_per_s",
        "itl_p99_during_long_prefill",
    }
    assert ag["ratios"]["tokens_per_s"] > 0
    assert len(ag["targets"]) == 4
    assert res["chart"] and Path(res["chart"]).stat().st_size > 1000
    again = tmp_path / "again.png"
    assert report_main([str(json_path), str(again)]) == 0
