"""The benchmark runs end to end on a tiny setting and writes its JSON and chart.

No timing assertions: only that every section is there and holds numbers. The real
mlx_lm.server and appliance processes run on loopback ports; the demo model comes from the
session's cache (demo_cache), so nothing is rebuilt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from matplotlib.image import imread

from benchmarks.chart import main as chart_main
from benchmarks.report import tables

ROOT = Path(__file__).resolve().parents[2]
# benchmarks/ is not installed: the processes run from other folders find it through PYTHONPATH.
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def bench_env(demo_cache: Path, scratch: Path) -> dict[str, str]:
    """The environment a bench run gets in a test: the session's model cache, this checkout on
    the path, temporary folders under `scratch`, no keys from the caller's environment."""
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(demo_cache),
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(scratch),
        "PYTHONPATH": PYTHONPATH,
    }
    for key in ("LMX_ADMIN_KEY", "LMX_API_KEYS"):
        env.pop(key, None)
    return env


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v >= 0


@pytest.mark.timeout(180)
def test_bench_end_to_end(tmp_path: Path, demo_cache: Path) -> None:
    out = tmp_path / "results"
    # Every process the bench starts runs in its temporary folder, here under tmp_path.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = bench_env(demo_cache, scratch)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--concurrency",
            "1,2",
            "--max-tokens",
            "4",
            "--requests-per-client",
            "2",
            "--min-requests",
            "3",
            "--repeat",
            "1",
            "--metrics-requests",
            "50",
            "--busy-requests",
            "5",
            "--cold-starts",
            "1",
            "--out",
            str(out),
            # 2 clients in 2 client processes; 1 client in this one.
            "--clients-per-process",
            "1",
            "--scenario",
            "serving",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    # Progress on stderr, tables on stdout.
    assert "ceiling" in proc.stderr and "warm-up" in proc.stderr
    assert "appliance / mlx_lm.server" in proc.stdout
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout

    (json_path,) = out.glob("bench-*.json")
    res = json.loads(json_path.read_text())
    assert res["chart"] and Path(res["chart"]).is_file()
    assert Path(res["chart"]).stat().st_size > 1000
    # The chart re-rendered from the JSON is the bench's own, pixel for pixel.
    again = tmp_path / "again.png"
    assert chart_main([str(json_path), str(again)]) == 0
    assert (imread(again) == imread(res["chart"])).all()
    for key in (
        "plan",
        "machine",
        "command",
        "ceiling",
        "runs",
        "servers",
        "ratios",
        "costs",
        "targets",
        "targets_kind",
        "table_markdown",
    ):
        assert key in res, key
    assert res["machine"]["cores"] >= 1 and res["machine"]["versions"]["mlx"]
    for c in ("1", "2"):
        assert _number(res["ceiling"]["best"][c]["tokens_per_s"])
        assert _number(res["ceiling"]["best"][c]["ttft_s"])
        assert _number(res["ceiling"]["best"][c]["cpu_ms_per_token"])
        # the ceiling's median: of the warm batches (a turn's first is not), at or below the best
        runs = res["ceiling"]["runs"][c]
        assert [r["warm"] for r in runs] == [False, True, True] * len(res["ceiling"]["mlx_envs"])
        median = res["ceiling"]["best"][c]["tokens_per_s_median"]
        env = res["ceiling"]["best"][c]["mlx_env"]
        warm = [r["tokens_per_s"] for r in runs if r["warm"] and r["mlx_env"] == env]
        assert median == pytest.approx(sum(warm) / 2)
        best_batch = max(r["tokens_per_s"] for r in runs)
        assert median <= best_batch == res["ceiling"]["best"][c]["tokens_per_s"]
        assert res["ratios"][c]["vs_ceiling_median"] >= res["ratios"][c]["vs_ceiling"]
        shown = f"| {median:.1f} | {res['ratios'][c]['vs_ceiling_median']:.2f}x |"
        assert shown in res["table_markdown"]
        for server in ("mlx_lm.server", "appliance"):
            best = res["servers"][server][c]
            # 2 a client, but a run sends at least 3: one client sends 3, two send 2 each.
            assert best["requests"] == {"1": 3, "2": 4}[c]
            assert best["errors"] == 0, res["runs"][server][c]
            assert best["tokens_counted_by"] == "usage"
            for key in (
                "tokens_per_s",
                "ttft_s_p50",
                "ttft_s_p99",
                "itl_s_p50",
                "itl_s_p99",
                "e2e_s_p50",
                "e2e_s_p99",
                "cpu_ms_per_token",
            ):
                assert _number(best[key]), (server, c, key, best[key])
            (run,) = res["runs"][server][c]
            assert run["tokens"] > 0
            assert run["client_processes"] == int(c)
            assert run["client_cpu_total"] >= run["client_cpu_fraction"] > 0
            # The appliance's joins, from its /metrics around the run: each request joined once.
            if server == "appliance":
                assert run["joined"] == run["requests"] and 1 <= run["joins"] <= run["requests"]
                assert f"c={c} {run['joined']}/{run['joins']}" in res["table_markdown"]
            else:
                assert "joins" not in run
        for key in (
            "vs_mlx",
            "vs_ceiling",
            "vs_ceiling_median",
            "ttft_p99_vs_mlx",
            "cpu_per_token_vs_mlx",
        ):
            assert _number(res["ratios"][c][key])

    costs = res["costs"]
    probes = costs["probes_during_load"]["appliance"]
    assert set(probes) == {"/healthz", "/metrics"}
    assert all(_number(p["p99_s"]) for p in probes.values())
    assert _number(costs["busy_rejection"]["p99_s"])
    assert costs["busy_rejection"]["statuses"].get("429", 0) >= 1
    m = costs["metrics_after_requests"]
    assert m["requests"] == 50 and _number(m["p50_s"]) and m["requests_total_in_metrics"] >= 50
    assert all(_number(v) for v in costs["rss_after_load_bytes"].values())
    assert costs["cold_start"]["samples_s"] and _number(costs["cold_start"]["median_s"])

    # On the CPU one ceiling worker, under the BLAS the appliance arranges (MLX's defaults
    # where it arranges none); where a second ran (a GPU, under the appliance's MLX settings),
    # the table says which one each concurrency's figure came from.
    if "gpu" not in res["ceiling"]["device"].lower():
        from appliance.engine import cpu

        blas = cpu.find_blas("auto")[0] is not None
        one = "the appliance's BLAS" if blas else "mlx defaults"
        assert res["ceiling"]["mlx_envs"] == [one]
        assert res["ceiling"]["best"]["1"]["mlx_env"] == one
        assert "ran under" not in res["table_markdown"]
    two = {**res, "ceiling": {**res["ceiling"], "mlx_envs": ["mlx defaults", "other settings"]}}
    two["ceiling"]["best"] = {
        **res["ceiling"]["best"],
        "1": {**res["ceiling"]["best"]["1"], "mlx_env": "mlx defaults"},
        "2": {**res["ceiling"]["best"]["2"], "mlx_env": "other settings"},
    }
    assert (
        "ran under mlx defaults and under other settings; the faster counts: "
        "c=1 mlx defaults, c=2 other settings."
    ) in tables(two)

    names = {t["name"] for t in res["targets"]}
    assert any("ceiling" in n for n in names) and any("cold start" in n for n in names)
    assert all(t["passed"] in (True, False, None) for t in res["targets"])

    # Every process the bench started (servers, ceiling, client processes) is gone.
    assert not _running_under(tmp_path)


def _running_under(folder: Path) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cwd"]):
        cwd = p.info.get("cwd") or ""
        if cwd.startswith(str(folder)):
            found.append(p.info["pid"])
    return found


def test_steptrace_reports_the_engines_steps(tmp_path: Path, demo_cache: Path) -> None:
    """The engine-only trace: 2 clients x 2 requests of 4 tokens, after a warm-up request each."""
    env = {**os.environ, "XDG_CACHE_HOME": str(demo_cache), "PYTHONPATH": PYTHONPATH}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.steptrace",
            "--clients",
            "2",
            "--requests",
            "2",
            "--max-tokens",
            "4",
            "--return-delay-ms",
            "5",
            "models.prompt_cache_min_tokens=0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("clients=2 delay<=5ms models.prompt_cache_min_tokens=0: "), line
    assert float(line.split(": ", 1)[1].split(" tok/s")[0]) > 0
    assert "TTFT p50" in line and "mean batch" in line
    # 4 requests of 4 tokens: at least 4 decode steps, and every request was prefilled.
    steps = int(line.split("steps ", 1)[1].split(",")[0])
    assert steps >= 4
    assert int(line.split("prefill calls ", 1)[1].split(" ")[0]) >= 1
    # Every request joined the batch (at least one join per arrival group), and the TTFT split
    # into waiting to join and the rest is there.
    assert int(line.split("joins ", 1)[1].split(";")[0]) >= 1
    assert "waiting to join p50" in line
