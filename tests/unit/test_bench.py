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


@pytest.mark.parametrize(
    "figures", sorted((ROOT / "docs" / "performance").glob("*.json")), ids=lambda p: p.name
)
def test_the_documented_figures_render(figures: Path, tmp_path: Path) -> None:
    png = tmp_path / "chart.png"
    assert chart_main([str(figures), str(png)]) == 0
    assert png.stat().st_size > 10_000
