"""The agent scenario's figures: per turn and per server, the ratios, the tables and the chart.

    python -m benchmarks.agent_report RESULT.json OUT.png

re-renders the chart from a result of `python -m benchmarks --agent`.

Definitions (turns numbered from 1):
- reusable prefix of turn t >= 2: the previous turn's prompt tokens plus its completion tokens
  (from its usage), at most this turn's prompt tokens; hit ratio: cached_tokens (the server's
  `usage.prompt_tokens_details.cached_tokens`) over it, summed over the sessions;
- decode tok/s of a request: its tokens after the first over the time from first to last;
  aggregate tokens/s: all completion tokens over the server's summed round times;
- ITL during a long prefill: the per-token gaps of any stream of a round that overlap the window
  from the long session's request to its first token (a gap spanning the window counts whole);
  steady ITL: the gaps that overlap no such window.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from benchmarks.agent import (
    AgentShape,
    TurnResult,
    hit_ratio,
    reusable_prefix,
    split_gaps,
    token_gaps,
)
from benchmarks.chart import rerender, save
from benchmarks.common import percentile
from benchmarks.report import fmt, fmt_ms
from benchmarks.scenarios import APPLIANCE, MLX_SERVER, SERVERS

# The targets the scenario is judged by (appliance / mlx_lm.server, and its own figures).
TTFT_RATIO_MAX = 0.5
TOKENS_RATIO_MIN = 1.5
HIT_RATIO_MIN = 0.9
STALL_RATIO_MAX = 2.0


def _p(values: Sequence[float], q: float) -> Optional[float]:
    return percentile(list(values), q)


def server_summary(results: Sequence[TurnResult], wall_s: float, turns: int) -> dict[str, Any]:
    """One server's figures: per turn, then over the run."""
    by = {(r.session, r.turn): r for r in results}
    reusable: dict[tuple[int, int], int] = {}
    for r in results:
        prev = by.get((r.session, r.turn - 1))
        if r.turn >= 1 and r.ok and prev is not None and prev.ok:
            reusable[(r.session, r.turn)] = reusable_prefix(
                prev.prompt_tokens, prev.completion_tokens, r.prompt_tokens
            )
    per_turn = []
    for t in range(turns):
        rs = [r for r in results if r.turn == t]
        ok = [r for r in rs if r.ok]
        reuse = [reusable[(r.session, t)] for r in ok if (r.session, t) in reusable]
        cached = [r.cached_tokens or 0 for r in ok if (r.session, t) in reusable]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        dec = [r.decode_tps for r in ok if r.decode_tps is not None]
        per_turn.append(
            {
                "turn": t + 1,
                "requests": len(rs),
                "errors": len(rs) - len(ok),
                "ttft_s_p50": _p(ttft, 50),
                "ttft_s_p99": _p(ttft, 99),
                "prompt_tokens_mean": _mean([r.prompt_tokens for r in ok]),
                "prompt_tokens_max": max((r.prompt_tokens for r in ok), default=None),
                "cached_tokens_mean": _mean([r.cached_tokens or 0 for r in ok]),
                "reusable_tokens_mean": _mean(reuse),
                "hit_ratio": hit_ratio(sum(cached), sum(reuse)) if reuse else None,
                "decode_tps_p50": _p(dec, 50),
                "completion_tokens": sum(r.completion_tokens for r in ok),
            }
        )
    inside: list[float] = []
    steady: list[float] = []
    for t in range(turns):
        rs = [r for r in results if r.turn == t and r.ok]
        windows = [(r.sent, r.first) for r in rs if r.long and r.first is not None]
        for r in rs:
            i, s = split_gaps(token_gaps(r.times, r.completion_tokens), windows)
            inside += i
            steady += s
    ok = [r for r in results if r.ok]
    later = [r for r in ok if r.turn >= 1]
    tokens = sum(r.completion_tokens for r in ok)
    reuse_all = [reusable[(r.session, r.turn)] for r in later if (r.session, r.turn) in reusable]
    cached_all = [r.cached_tokens or 0 for r in later if (r.session, r.turn) in reusable]
    during_p99, steady_p50 = _p(inside, 99), _p(steady, 50)
    return {
        "turns": per_turn,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error or "" for r in results if not r.ok})[:3],
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_s_p50_turns_ge2": _p([r.ttft_s for r in later if r.ttft_s is not None], 50),
        "ttft_s_p99_turns_ge2": _p([r.ttft_s for r in later if r.ttft_s is not None], 99),
        "hit_ratio_turns_ge2": hit_ratio(sum(cached_all), sum(reuse_all)) if reuse_all else None,
        "cached_tokens_reported": any(r.cached_tokens is not None for r in ok),
        "decode_tps_p50": _p([d for r in ok if (d := r.decode_tps) is not None], 50),
        "itl_s_during_long_prefill_p50": _p(inside, 50),
        "itl_s_during_long_prefill_p99": during_p99,
        "itl_during_long_prefill_n": len(inside),
        "itl_s_steady_p50": steady_p50,
        "itl_s_steady_p99": _p(steady, 99),
        "itl_steady_n": len(steady),
        "stall_ratio": during_p99 / steady_p50 if during_p99 is not None and steady_p50 else None,
        "tool_calls_in_answers": sum(r.tool_calls for r in ok),
    }


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def summarize(raw: dict[str, Any], shape: AgentShape, estimate: int) -> dict[str, Any]:
    """The JSON's `agent` section from run_scenario's results."""
    from dataclasses import asdict

    servers = {
        n: server_summary(rs, raw["wall_s"][n], shape.turns) for n, rs in raw["results"].items()
    }
    out: dict[str, Any] = {
        "shape": asdict(shape),
        "longest_prompt_estimate_tokens": estimate,
        "interleaving": "rounds (one turn of every session) alternate between the servers, "
        "appliance first in odd rounds, mlx_lm.server first in even ones; each server keeps "
        "its own conversations",
        "long_session": "in turn 1 sessions 2.. send once session 1 has its first token; in "
        "turn t >= 2 session (t - 2) mod S + 1 brings long content and sends once every other "
        "session has its first token",
        "servers": servers,
        "requests": {n: [_slim(r) for r in rs] for n, rs in raw["results"].items()},
    }
    a, m = servers.get(APPLIANCE), servers.get(MLX_SERVER)
    if a and m:
        out["ratios"] = {
            "ttft_p50_turns_ge2": _ratio(a["ttft_s_p50_turns_ge2"], m["ttft_s_p50_turns_ge2"]),
            "tokens_per_s": _ratio(a["tokens_per_s"], m["tokens_per_s"]),
            "itl_p99_during_long_prefill": _ratio(
                a["itl_s_during_long_prefill_p99"], m["itl_s_during_long_prefill_p99"]
            ),
        }
    out["targets"] = _targets(out)
    return out


def _slim(r: TurnResult) -> dict[str, Any]:
    """A request in the JSON: its figures, not its text or every event time."""
    return {
        "session": r.session + 1,
        "turn": r.turn + 1,
        "long": r.long,
        "ok": r.ok,
        "error": r.error,
        "ttft_s": r.ttft_s,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
        "decode_tps": r.decode_tps,
        "e2e_s": r.end - r.sent,
    }


def _targets(agent: dict[str, Any]) -> list[dict[str, Any]]:
    ratios = agent.get("ratios") or {}
    a = agent["servers"].get(APPLIANCE) or {}
    rows = [
        ("TTFT p50 turns >= 2, appliance / mlx_lm.server", ratios.get("ttft_p50_turns_ge2"),
         f"<= {TTFT_RATIO_MAX}x", lambda v: v <= TTFT_RATIO_MAX),
        ("aggregate tokens/s, appliance / mlx_lm.server", ratios.get("tokens_per_s"),
         f">= {TOKENS_RATIO_MIN}x", lambda v: v >= TOKENS_RATIO_MIN),
        ("appliance cache hit ratio, turns >= 2", a.get("hit_ratio_turns_ge2"),
         f">= {HIT_RATIO_MIN}", lambda v: v >= HIT_RATIO_MIN),
        ("appliance ITL p99 during a long prefill / steady ITL p50", a.get("stall_ratio"),
         f"<= {STALL_RATIO_MAX}x", lambda v: v <= STALL_RATIO_MAX),
    ]  # fmt: skip
    return [
        {"name": n, "value": v, "target": t, "passed": None if v is None else bool(ok(v))}
        for n, v, t, ok in rows
    ]


def agent_tables(res: dict[str, Any]) -> str:
    """The agent result in Markdown: per turn, the summary with ratios, the targets."""
    ag, mach, plan = res["agent"], res["machine"], res["plan"]
    sh = ag["shape"]
    names = [n for n in SERVERS if n in ag["servers"]]
    gpus = f"; GPU {', '.join(mach['gpus'])}" if mach.get("gpus") else ""
    lines = [
        f"Agent scenario ({sh['name']}): {sh['sessions']} sessions x {sh['turns']} turns, "
        f"{sh['max_tokens']} tokens per answer, greedy; model {plan['model_label']}; "
        f"{ag['long_session']}.",
        f"Machine: {mach['cpu']}, {mach['cores']} cores{gpus}; MLX "
        f"{mach['versions'].get('mlx', '?')}, mlx-lm {mach['versions'].get('mlx-lm', '?')}.",
        f"Interleaving: {ag['interleaving']}.",
        "",
        "Per turn (means over the sessions; hit ratio = cached / reusable prefix):",
        "",
        "| turn | server | prompt tokens | cached | reusable | hit ratio | TTFT p50 ms "
        "| TTFT p99 ms | decode tok/s p50 | failed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in range(sh["turns"]):
        for n in names:
            row = ag["servers"][n]["turns"][t]
            lines.append(
                f"| {row['turn']} | {n} | {fmt(row['prompt_tokens_mean'], '{:.0f}')} | "
                f"{fmt(row['cached_tokens_mean'], '{:.0f}')} | "
                f"{fmt(row['reusable_tokens_mean'], '{:.0f}')} | "
                f"{fmt(row['hit_ratio'], '{:.2f}')} | {fmt_ms(row['ttft_s_p50'])} | "
                f"{fmt_ms(row['ttft_s_p99'])} | {fmt(row['decode_tps_p50'])} | "
                f"{row['errors']} / {row['requests']} |"
            )
    ratios = ag.get("ratios") or {}
    lines += [
        "",
        "Over the run:",
        "",
        "| figure | " + " | ".join(names) + (" | appliance / mlx_lm.server |" if ratios else " |"),
        "|---|" + "---:|" * (len(names) + (1 if ratios else 0)),
    ]
    rows = [
        ("TTFT p50, turns >= 2 (ms)", "ttft_s_p50_turns_ge2", fmt_ms, "ttft_p50_turns_ge2"),
        ("TTFT p99, turns >= 2 (ms)", "ttft_s_p99_turns_ge2", fmt_ms, None),
        ("aggregate tokens/s", "tokens_per_s", fmt, "tokens_per_s"),
        ("decode tok/s per stream, p50", "decode_tps_p50", fmt, None),
        ("cache hit ratio, turns >= 2", "hit_ratio_turns_ge2", _f2, None),
        ("ITL p99 during a long prefill (ms)", "itl_s_during_long_prefill_p99", fmt_ms,
         "itl_p99_during_long_prefill"),
        ("ITL gaps during long prefills, n", "itl_during_long_prefill_n", _int, None),
        ("ITL p50 steady (ms)", "itl_s_steady_p50", fmt_ms, None),
        ("ITL p99 steady (ms)", "itl_s_steady_p99", fmt_ms, None),
        ("stall ratio (ITL p99 during / steady p50)", "stall_ratio", _f2, None),
        ("failed requests", "errors", _int, None),
    ]  # fmt: skip
    for label, key, f, rkey in rows:
        cells = [f(ag["servers"][n].get(key)) for n in names]
        extra = [fmt(ratios.get(rkey), "{:.2f}x") if rkey else ""] if ratios else []
        lines.append(f"| {label} | " + " | ".join(cells + extra) + " |")
    lines += ["", "Targets:", "", "| target | value | wanted | result |", "|---|---:|---:|---|"]
    for t in ag["targets"]:
        verdict = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"| {t['name']} | {_f2(t['value'])} | {t['target']} | {verdict} |")
    missing = [n for n in names if not ag["servers"][n]["cached_tokens_reported"]]
    if missing:
        lines += ["", f"No cached_tokens in the usage of: {', '.join(missing)} (counted as 0)."]
    return "\n".join(lines)


def _f2(v: Optional[float]) -> str:
    return fmt(v, "{:.2f}")


def _int(v: Optional[float]) -> str:
    return "-" if v is None else str(int(v))


def agent_chart(res: dict[str, Any], path: Path) -> None:
    """TTFT p50 (p99 dashed) per turn for each server, and the cache hit ratio per turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ag = res["agent"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for n, color in ((MLX_SERVER, "tab:blue"), (APPLIANCE, "tab:orange")):
        s = ag["servers"].get(n)
        if not s:
            continue
        turns = [row["turn"] for row in s["turns"]]

        def ys(
            key: str, scale: float = 1.0, rows: list[dict[str, Any]] = s["turns"]
        ) -> list[float]:
            return [row[key] * scale if row[key] is not None else float("nan") for row in rows]

        ax1.plot(turns, ys("ttft_s_p50", 1000.0), "o-", color=color, label=f"{n} p50")
        ax1.plot(turns, ys("ttft_s_p99", 1000.0), "--", color=color, alpha=0.6, label=f"{n} p99")
        ax2.plot(turns, ys("hit_ratio"), "s-", color=color, label=n)
    turns_all = [row["turn"] for s in ag["servers"].values() for row in s["turns"]]
    for ax in (ax1, ax2):
        ax.set_xticks(sorted(set(turns_all)))
    ax1.set_xlabel("turn")
    ax1.set_ylabel("ms")
    ax1.set_title("Time to first token per turn")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("turn")
    ax2.set_ylabel("cached / reusable prefix")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("Prompt cache hit ratio per turn")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    sh, mach = ag["shape"], res.get("machine", {})
    where = (
        mach["gpus"][0]
        if mach.get("gpus")
        else f"{mach.get('cpu', '?')} ({mach.get('cores', '?')} cores)"
    )
    fig.suptitle(
        f"Agent sessions: {sh['sessions']} x {sh['turns']} turns, {res['plan']['model_label']}"
        f" — {where}",
        fontsize=9,
    )
    save(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    return rerender(
        argv,
        "python -m benchmarks.agent_report",
        "the agent scenario's chart",
        "a JSON of `python -m benchmarks --agent`",
        agent_chart,
    )


if __name__ == "__main__":
    sys.exit(main())
