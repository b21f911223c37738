"""The report: the machine, the targets judged, and the result tables in Markdown."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from benchmarks.scenarios import (
    ACCEL_TARGETS,
    APPLIANCE,
    BUSY_P99_S,
    COLD_START_S,
    CPU_TARGETS,
    METRICS_SCRAPE_S,
    MLX_SERVER,
    SERVERS,
)


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python, package versions and GPUs of this machine."""
    import psutil

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = f"{platform.system()} {platform.release()}"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"') + f" (kernel {platform.release()})"
    if sys.platform == "darwin":
        with contextlib.suppress(Exception):
            cpu = (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
                or cpu
            )
            os_name = f"macOS {platform.mac_ver()[0]}"
    versions = {}
    for pkg in ("mlx", "mlx-lm", "mlx-cuda", "mlx-metal", "falcon", "uvicorn", "httpx"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[pkg] = version(pkg)
    gpus: list[str] = []
    with contextlib.suppress(Exception):
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        gpus = [g.strip() for g in r.stdout.splitlines() if g.strip()]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": os_name,
        "python": platform.python_version(),
        "versions": versions,
        "gpus": gpus,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


@dataclass
class Target:
    """One target: the figure, what was wanted, and whether it was met (None: no figure)."""

    name: str
    value: Optional[float]
    target: str
    passed: Optional[bool]


def evaluate(res: dict[str, Any], kind: str) -> list[Target]:
    """The targets of `kind` (cpu or accelerator) judged on a finished run's result."""
    t = ACCEL_TARGETS if kind == "accelerator" else CPU_TARGETS
    out: list[Target] = []
    best = res["servers"]
    ratios = res["ratios"]
    for c, limit in t.vs_mlx.items():
        v = ratios.get(str(c), {}).get("vs_mlx")
        out.append(
            Target(
                f"tokens/s c={c} appliance / mlx_lm.server",
                v,
                f">= {limit}x",
                None if v is None else v >= limit,
            )
        )
    for c in res["plan"]["concurrency"]:
        v = ratios.get(str(c), {}).get("vs_ceiling")
        lim = t.vs_ceiling
        out.append(
            Target(
                f"tokens/s c={c} appliance / ceiling",
                v,
                f">= {lim}x",
                None if v is None else v >= lim,
            )
        )
    for c, limit in t.ttft_p99_vs_mlx.items():
        v = ratios.get(str(c), {}).get("ttft_p99_vs_mlx")
        out.append(
            Target(
                f"TTFT p99 c={c} appliance / mlx_lm.server",
                v,
                f"<= {limit}x",
                None if v is None else v <= limit,
            )
        )
    for c in t.zero_errors_at:
        app = best[APPLIANCE].get(str(c))
        v = None if app is None else float(app["errors"])
        out.append(
            Target(f"failed requests c={c} (appliance)", v, "== 0", None if v is None else v == 0)
        )
    costs = res.get("costs") or {}
    busy = costs.get("busy_rejection") or {}
    v = busy.get("p99_s")
    out.append(
        Target(
            "busy rejection (429) p99, s",
            v,
            f"< {BUSY_P99_S}",
            None if v is None else v < BUSY_P99_S,
        )
    )
    m = costs.get("metrics_after_requests") or {}
    v = m.get("p50_s")
    out.append(
        Target(
            f"/metrics scrape after {m.get('requests', '?')} requests (median), s",
            v,
            f"< {METRICS_SCRAPE_S}",
            None if v is None else v < METRICS_SCRAPE_S,
        )
    )
    cs = costs.get("cold_start") or {}
    v = cs.get("median_s")
    out.append(
        Target(
            "cold start to /readyz 200 (median), s",
            v,
            f"< {COLD_START_S}",
            None if v is None else v < COLD_START_S,
        )
    )
    return out


def fmt(v: Optional[float], spec: str = "{:.1f}") -> str:
    """A figure for a table; "-" for none."""
    return "-" if v is None else spec.format(v)


def fmt_ms(v: Optional[float]) -> str:
    """Seconds shown as milliseconds; "-" for none."""
    return "-" if v is None else f"{v * 1000:.1f}"


def ceiling_median(runs: list[dict[str, Any]]) -> float:
    """A check on the ceiling's best: under noise a best of many beats a server's single run by
    chance. The median of the warm batches (not a turn's first) under the MLX setting whose
    batch was the best."""
    env = max(runs, key=lambda r: r["tokens_per_s"])["mlx_env"]
    same = [r for r in runs if r["mlx_env"] == env]
    warm = [r for r in same if r.get("warm")] or same
    return float(statistics.median(r["tokens_per_s"] for r in warm))


X2 = "{:.2f}x"


def tables(res: dict[str, Any]) -> str:
    """The result tables in Markdown."""
    parts: list[list[str]] = []
    if "servers" in res:
        parts += [
            _header(res),
            _throughput(res),
            _cpu_per_token(res),
            _latency(res),
            _joins(res),
            _costs(res),
        ]
    if res.get("cpu_real"):
        from benchmarks.cpu_real import table

        parts.append(["", table(res["cpu_real"])])
    parts.append(_targets(res))
    if "servers" in res:
        parts.append(_notes(res))
    return "\n".join(line for part in parts for line in part)


def _header(res: dict[str, Any]) -> list[str]:
    plan, mach = res["plan"], res["machine"]
    loads = [r.get("load_average_1m") for rs in res["ceiling"]["runs"].values() for r in rs]
    loads += [
        r.get("load_average_1m") for n in SERVERS for rs in res["runs"][n].values() for r in rs
    ]
    got = [x for x in loads if isinstance(x, (int, float))]
    at_least = (
        f" (at least {plan['min_requests']} a run: more per client at low concurrency)"
        if plan.get("min_requests", 0) > plan["requests_per_client"]
        else ""
    )
    gpus = f"; GPU {', '.join(mach['gpus'])}" if mach.get("gpus") else ""
    return [
        f"Model: {plan['model_label']} ({plan['model_path']}); {plan['max_tokens']} tokens per "
        f"request, greedy; {plan['requests_per_client']} requests per client per run{at_least}; "
        f"device {res['ceiling']['device']}.",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_bytes'] / 2**30:.0f} GiB, "
        f"{mach['os']}; MLX {mach['versions'].get('mlx', '?')}, mlx-lm "
        f"{mach['versions'].get('mlx-lm', '?')}{gpus}.",
        "Load average (1 min) during the runs: "
        + (f"{min(got):.1f} to {max(got):.1f}" if got else "n/a")
        + ".",
    ]


def _throughput(res: dict[str, Any]) -> list[str]:
    conc, ceil, srv, ratios = (
        res["plan"]["concurrency"],
        res["ceiling"]["best"],
        res["servers"],
        res["ratios"],
    )
    lines = [
        "",
        "Throughput (aggregate generated tokens/s, best of "
        f"{res['plan']['repeat']} repetitions, the ceiling best of "
        f"{len(res['ceiling']['runs'][str(conc[0])])} batches, and its median: of the warm "
        "batches under the MLX setting of its best; servers' tokens from each stream's usage):",
        "",
        "| clients | ceiling | mlx_lm.server | appliance | appliance / mlx_lm.server "
        "| appliance / ceiling | ceiling, median | appliance / that |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conc:
        k = str(c)
        m, a, r = srv[MLX_SERVER].get(k, {}), srv[APPLIANCE].get(k, {}), ratios.get(k, {})
        cl = ceil.get(k, {})
        lines.append(
            f"| {c} | {fmt(cl.get('tokens_per_s'))} | {fmt(m.get('tokens_per_s'))} | "
            f"{fmt(a.get('tokens_per_s'))} | {fmt(r.get('vs_mlx'), X2)} | "
            f"{fmt(r.get('vs_ceiling'), X2)} | {fmt(cl.get('tokens_per_s_median'))} | "
            f"{fmt(r.get('vs_ceiling_median'), X2)} |"
        )
    envs = res["ceiling"].get("mlx_envs", [])
    if len(envs) > 1:
        lines += [
            "",
            "The ceiling ran under "
            + " and under ".join(envs)
            + "; the faster counts: "
            + ", ".join(f"c={c} {ceil.get(str(c), {}).get('mlx_env', '?')}" for c in conc)
            + ".",
        ]
    return lines


def _cpu_per_token(res: dict[str, Any]) -> list[str]:
    ceil, srv = res["ceiling"]["best"], res["servers"]
    lines = [
        "",
        "CPU per generated token, ms (the server's whole process, all threads; least of the "
        "repetitions). Contention from other work on the machine distorts it far less than "
        "tokens/s:",
        "",
        "| clients | ceiling | mlx_lm.server | appliance | appliance / mlx_lm.server |",
        "|---:|---:|---:|---:|---:|",
    ]
    for c in res["plan"]["concurrency"]:
        k = str(c)
        cc = ceil.get(k, {}).get("cpu_ms_per_token")
        mc = srv[MLX_SERVER].get(k, {}).get("cpu_ms_per_token")
        ac = srv[APPLIANCE].get(k, {}).get("cpu_ms_per_token")
        lines.append(
            f"| {c} | {fmt(cc, '{:.2f}')} | {fmt(mc, '{:.2f}')} | {fmt(ac, '{:.2f}')} | "
            f"{fmt(ac / mc if ac and mc else None, X2)} |"
        )
    return lines


def _latency(res: dict[str, Any]) -> list[str]:
    ceil, srv = res["ceiling"]["best"], res["servers"]
    lines = [
        "",
        "Latency in ms (p50 / p99, best of the repetitions per figure) and failed requests "
        "(all repetitions):",
        "",
        "| clients | server | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | e2e p99 "
        "| failed / requests |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in res["plan"]["concurrency"]:
        k = str(c)
        lines.append(
            f"| {c} | ceiling (batch) | {fmt_ms(ceil.get(k, {}).get('ttft_s'))} | | | | | | |"
        )
        for name in SERVERS:
            s = srv[name].get(k)
            if not s:
                continue
            lines.append(
                f"| {c} | {name} | {fmt_ms(s['ttft_s_p50'])} | {fmt_ms(s['ttft_s_p99'])} | "
                f"{fmt_ms(s['itl_s_p50'])} | {fmt_ms(s['itl_s_p99'])} | {fmt_ms(s['e2e_s_p50'])} | "
                f"{fmt_ms(s['e2e_s_p99'])} | {s['errors']} / {s['requests']} |"
            )
    return lines


def _joins(res: dict[str, Any]) -> list[str]:
    joins = [
        (c, r)
        for c in res["plan"]["concurrency"]
        for r in res["runs"][APPLIANCE].get(str(c), [])
        if r.get("joins")
    ]
    if not joins:
        return []
    return [
        "",
        "The appliance's joins into the running batch (prefill calls for arriving "
        "requests), requests / joins per run: "
        + ", ".join(f"c={c} {r['joined']}/{r['joins']}" for c, r in joins)
        + ".",
    ]


def _three(st: dict[str, Any]) -> str:
    return f"{fmt_ms(st['p50_s'])} / {fmt_ms(st['p99_s'])} / {fmt_ms(st['max_s'])}"


def _costs(res: dict[str, Any]) -> list[str]:
    costs = res.get("costs")
    if not costs:
        return []
    top = max(res["plan"]["concurrency"])
    lines = ["", "The appliance's own costs:", "", "| cost | value |", "|---|---:|"]
    probes = costs.get("probes_during_load") or {}
    for path, st in probes.get(APPLIANCE, {}).items():
        lines.append(
            f"| GET {path} during c={top} load, p50 / p99 / max (ms), n={st['n']} | {_three(st)} |"
        )
    for path, st in probes.get(MLX_SERVER, {}).items():
        lines.append(
            f"| (mlx_lm.server GET {path} during c={top} load, p50 / p99 / max, ms) "
            f"| {_three(st)} |"
        )
    b = costs.get("busy_rejection") or {}
    if b:
        lines.append(
            f"| busy rejection 429, p50 / p99 / max (ms), n={b['rejected']} | {_three(b)} |"
        )
    m = costs.get("metrics_after_requests") or {}
    if m:
        lines.append(
            f"| /metrics after {m['requests']} more requests "
            f"({int(m['requests_total_in_metrics'])} in requests_total), p50 / p99 (ms), "
            f"{m['bytes']} bytes | {fmt_ms(m['p50_s'])} / {fmt_ms(m['p99_s'])} |"
        )
    for name, rss in (costs.get("rss_after_load_bytes") or {}).items():
        mib = fmt(rss / 2**20 if rss else None, "{:.0f}")
        lines.append(f"| RSS after load, {name} (MiB) | {mib} |")
    rss2 = costs.get("appliance_rss_after_metrics_requests_bytes")
    if rss2:
        lines.append(f"| RSS after the /metrics requests, appliance (MiB) | {rss2 / 2**20:.0f} |")
    cs = costs.get("cold_start") or {}
    if cs:
        samples = ", ".join(f"{s:.2f}" for s in cs["samples_s"])
        lines.append(
            f"| cold start to /readyz 200, median (s) [samples: {samples}] "
            f"| {fmt(cs['median_s'], '{:.2f}')} |"
        )
    return lines


def _targets(res: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Targets ({res['targets_kind']}):",
        "",
        "| target | value | wanted | result |",
        "|---|---:|---:|---|",
    ]
    for t in res["targets"]:
        v = t["value"]
        shown = "-" if v is None else (f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}")
        verdict = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"| {t['name']} | {shown} | {t['target']} | {verdict} |")
    return lines


def _notes(res: dict[str, Any]) -> list[str]:
    conc, srv = res["plan"]["concurrency"], res["servers"]
    lines = []
    if any(
        srv[n].get(str(c), {}).get("tokens_counted_by") == "tokenizer"
        for n in SERVERS
        for c in conc
    ):
        lines += [
            "",
            "Note: a server sent no usage in its streams; its tokens were counted by "
            "tokenizing the returned text.",
        ]
    cpu_frac = max(
        (
            srv[n][str(c)]["client_cpu_fraction_max"]
            for n in SERVERS
            for c in conc
            if str(c) in srv[n]
        ),
        default=0.0,
    )
    nproc = max(
        (
            srv[n][str(c)].get("client_processes_max", 1)
            for n in SERVERS
            for c in conc
            if str(c) in srv[n]
        ),
        default=1,
    )
    lines += [
        "",
        f"Load client CPU: at most {cpu_frac:.0%} of one core during a run"
        + (f" (the busiest of up to {nproc} client processes)." if nproc > 1 else "."),
    ]
    if cpu_frac > 0.7:
        lines.append(
            "Warning: the load client was near one full core; at that rate it may limit "
            "the servers' figures (fewer clients or a faster machine for the client)."
        )
    return lines
