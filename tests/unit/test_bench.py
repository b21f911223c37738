"""The bench's pure parts: percentiles, and its chart re-rendered from a file of figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from benchmarks.chart import main as chart_main
from benchmarks.common import percentile

ROOT = Path(__file__).resolve().parents[2]


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def _figures(ttft: dict[str, float], cpu: dict[str, float]) -> dict[str, object]:
    conc = ["1", "8"]
    return {
        "plan": {"concurrency": [1, 8], "repeat": 3, "max_tokens": 128, "model_label": "m"},
        "machine": {"gpus": ["NVIDIA H200"]},
        "ceiling": {"best": {c: {"tokens_per_s": 100.0 * int(c)} for c in conc}},
        "servers": {
            name: {
                c: {
                    "tokens_per_s": f * int(c),
                    "ttft_s_p99": ttft.get(c),
                    "cpu_ms_per_token": cpu.get(c),
                }
                for c in conc
            }
            for name, f in (("mlx_lm.server", 50.0), ("appliance", 90.0))
        },
        "chart_note": "figures from a table",
    }


def _panels(png: Path) -> int:
    # Each panel is 5 inches wide at 110 dpi.
    return round(imread(png).shape[1] / 550)


def test_chart_leaves_out_panels_without_figures(tmp_path: Path) -> None:
    for ttft, cpu, panels in (({}, {}, 1), ({"8": 0.1}, {}, 2), ({"8": 0.1}, {"1": 2.0}, 3)):
        src = tmp_path / "figures.json"
        src.write_text(json.dumps(_figures(ttft, cpu)))
        png = tmp_path / f"chart-{panels}.png"
        assert chart_main([str(src), str(png)]) == 0
        assert _panels(png) == panels


# The bench's result files (cpu-step-*.json are benchmarks.cpu_step's runs, a table's source).
BENCH_RESULTS = sorted(
    p for p in (ROOT / "docs" / "performance").glob("*.json") if not p.name.startswith("cpu-step")
)


@pytest.mark.parametrize("figures", BENCH_RESULTS, ids=lambda p: p.name)
def test_the_documented_figures_render(figures: Path, tmp_path: Path) -> None:
    png = tmp_path / "chart.png"
    assert chart_main([str(figures), str(png)]) == 0
    assert png.stat().st_size > 10_000


def _cpu_real(with_llama: bool) -> dict[str, object]:
    def who(prefill: list[float], decode: list[float]) -> dict[str, object]:
        return {
            "prompt_tokens": 120,
            "decode_tokens": 64,
            "prefill_tok_s": prefill,
            "decode_tok_s": decode,
            "prefill_best_tok_s": max(prefill),
            "decode_best_tok_s": max(decode),
        }

    from benchmarks.cpu_real import ratios

    res: dict[str, object] = {
        "model": "SmolLM2",
        "repeat": 2,
        "straightforward": who([7.0, 8.0], [7.5, 7.0]),
        "appliance": who([250.0, 240.0], [15.0, 16.0]),
        "appliance_engine": who([300.0, 280.0], [20.0, 18.0]),
        "llama_cpp": who([260.0, 250.0], [70.0, 69.0]) if with_llama else None,
    }
    res["ratios"] = ratios(res)
    return res


def test_cpu_real_ratios_table_and_targets() -> None:
    from benchmarks.cpu_real import table, targets
    from benchmarks.report import tables

    cr = _cpu_real(with_llama=True)
    assert cr["ratios"]["appliance_prefill"] == pytest.approx(250 / 8)  # type: ignore[index]
    assert cr["ratios"]["appliance_decode"] == pytest.approx(16 / 7.5)  # type: ignore[index]
    text = table(cr)
    assert "| appliance, over HTTP | 250.0 | 31.2x | 16.0 | 2.1x |" in text
    assert "llama.cpp" in text and "prefill >= 20x: 31.2x met" in text
    rows = targets(cr)
    assert [r["passed"] for r in rows] == [True, True]
    # a run of the cpu-real scenario alone: its table and its targets, no serving tables
    res = {"cpu_real": cr, "targets": rows, "targets_kind": "cpu"}
    out = tables(res)
    assert "straightforward load" in out and "PASS" in out and "mlx_lm.server" not in out
    slow = _cpu_real(with_llama=False)
    slow["appliance"]["decode_best_tok_s"] = 10.0  # type: ignore[index]
    from benchmarks.cpu_real import ratios

    slow["ratios"] = ratios(slow)
    assert [r["passed"] for r in targets(slow)] == [True, False]
    assert "llama.cpp" not in table(slow) and "decode >= 2x: 1.3x NOT met" in table(slow)


def test_cpu_real_chart_renders_from_a_result_file(tmp_path: Path) -> None:
    src = tmp_path / "cpu-real.json"
    src.write_text(json.dumps({"cpu_real": _cpu_real(with_llama=True), "machine": {}}))
    png = tmp_path / "cpu-real.png"
    assert chart_main([str(src), str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_scenario_flag() -> None:
    from benchmarks.bench import parser

    assert parser().parse_args([]).scenario == "auto"
    assert parser().parse_args(["--scenario", "cpu-real"]).scenario == "cpu-real"
    with pytest.raises(SystemExit):
        parser().parse_args(["--scenario", "nope"])
