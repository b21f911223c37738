"""The bench's chart: tokens/s for the three, TTFT p99 and CPU per token for the servers.

    python -m benchmarks.chart RESULT.json OUT.png

re-renders it from a bench result (the JSON `python -m benchmarks` writes) or from a file of
figures with the same keys, where a figure may be missing: plan.concurrency, plan.repeat,
plan.max_tokens, plan.model_label, machine (cpu, cores, gpus), ceiling.best[c].tokens_per_s,
servers[name][c] (tokens_per_s, ttft_s_p99, cpu_ms_per_token), and an optional chart_note.
A panel with no figure is left out; a missing figure is left blank, never drawn as zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from benchmarks.scenarios import APPLIANCE, MLX_SERVER

_SERVERS = ((MLX_SERVER, "tab:blue"), (APPLIANCE, "tab:orange"))


def _series(res: dict[str, Any], name: str, key: str) -> list[Optional[float]]:
    src = res["ceiling"]["best"] if name == "ceiling" else res["servers"].get(name, {})
    return [src.get(str(c), {}).get(key) for c in res["plan"]["concurrency"]]


def _bars(
    ax: Any, res: dict[str, Any], named: list[tuple[str, str]], key: str, scale: float
) -> None:
    conc = res["plan"]["concurrency"]
    width = 0.76 / len(named)
    for k, (name, color) in enumerate(named):
        offset = (k - (len(named) - 1) / 2) * width
        pts = [
            (x + offset, y * scale) for x, y in enumerate(_series(res, name, key)) if y is not None
        ]
        ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=name, color=color)
    ax.set_xticks(range(len(conc)), [str(c) for c in conc])
    ax.set_xlabel("concurrent streaming clients")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()


def _has(res: dict[str, Any], names: list[str], key: str) -> bool:
    return any(y is not None for n in names for y in _series(res, n, key))


def chart(res: dict[str, Any], path: Path) -> None:
    """Tokens/s per concurrency for the three, TTFT p99 and CPU per token for the servers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = res["plan"]["concurrency"]
    servers = [n for n, _ in _SERVERS]
    panels = ["throughput"]
    if _has(res, servers, "ttft_s_p99"):
        panels.append("ttft")
    if _has(res, ["ceiling", *servers], "cpu_ms_per_token"):
        panels.append("cpu")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "throughput":
            xs = list(range(len(conc)))
            for name, style in (("ceiling", "k--"), (MLX_SERVER, "o-"), (APPLIANCE, "s-")):
                ys = [
                    y if y is not None else float("nan") for y in _series(res, name, "tokens_per_s")
                ]
                ax.plot(
                    xs, ys, style, label="ceiling (BatchGenerator)" if name == "ceiling" else name
                )
            ax.set_xticks(xs, [str(c) for c in conc])
            ax.set_xlabel("concurrent streaming clients")
            ax.set_ylabel("generated tokens / s")
            ax.set_title(f"Aggregate throughput (best of {res['plan']['repeat']})")
            ax.grid(alpha=0.3)
            ax.legend()
        elif panel == "ttft":
            _bars(ax, res, list(_SERVERS), "ttft_s_p99", 1000.0)
            ax.set_ylabel("ms")
            ax.set_title("Time to first token, p99")
        else:
            _bars(ax, res, [("ceiling", "0.4"), *_SERVERS], "cpu_ms_per_token", 1.0)
            ax.set_ylabel("CPU ms per generated token")
            ax.set_title("Process CPU per token (lower is better)")
    mach = res.get("machine", {})
    where = (
        mach["gpus"][0]
        if mach.get("gpus")
        else f"{mach.get('cpu', '?')} ({mach.get('cores', '?')} cores)"
    )
    title = f"{res['plan']['model_label']}, max_tokens {res['plan']['max_tokens']} — {where}"
    if res.get("chart_note"):
        title += "\n" + res["chart_note"]
    fig.suptitle(title, fontsize=9)
    save(fig, path)


def chart_cpu_real(res: dict[str, Any], path: Path) -> None:
    """The cpu-real scenario: prefill and decode tokens/s per contender (log scale), with each
    bar's ratio to the straightforward load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cr = res["cpu_real"]
    who = [
        ("straightforward", "straightforward load", "0.6"),
        ("appliance", "appliance (HTTP)", "tab:orange"),
        ("appliance_engine", "appliance engine path", "tab:red"),
        ("llama_cpp", "llama.cpp", "tab:green"),
    ]
    who = [w for w in who if cr.get(w[0])]
    base = cr["straightforward"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), squeeze=False)
    for ax, fig_name in zip(axes[0], ("prefill", "decode"), strict=True):
        key = f"{fig_name}_best_tok_s"
        for i, (name, label, color) in enumerate(who):
            v = cr[name].get(key)
            if not v:
                continue
            ax.bar(i, v, 0.7, color=color, label=label)
            ratio = v / base[key] if base.get(key) else None
            text = f"{v:,.1f}" + (f"\n{ratio:.1f}x" if ratio and name != "straightforward" else "")
            ax.annotate(text, (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        top = max((cr[n].get(key) or 0) for n, _, _ in who)
        if top:
            ax.set_ylim(top=top * 3)  # room for the labels above the bars (log scale)
        ax.set_xticks(range(len(who)), [w[1] for w in who], rotation=15, fontsize=8)
        ax.set_ylabel("tokens / s (log scale)")
        tokens = base.get("prompt_tokens") if fig_name == "prefill" else base.get("decode_tokens")
        what = f"{tokens}-token prompt" if fig_name == "prefill" else f"{tokens} tokens"
        ax.set_title(f"{fig_name.capitalize()}, {what} (best of {cr.get('repeat')})")
        ax.grid(alpha=0.3, axis="y")
    mach = res.get("machine", {})
    fig.suptitle(
        f"{cr.get('model', 'SmolLM2')} on the CPU, one sequence, greedy — "
        f"{mach.get('cpu', '?')} ({mach.get('cores', '?')} cores)",
        fontsize=9,
    )
    save(fig, path)


def save(fig: Any, path: Path) -> None:
    """Lay the figure out, write it as a PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rerender(
    argv: Optional[list[str]],
    prog: str,
    what: str,
    result_help: str,
    draw: Callable[[dict[str, Any], Path], None],
) -> int:
    """A re-rendering command: `prog RESULT.json OUT.png` draws `draw` from a result file."""
    p = argparse.ArgumentParser(prog=prog, description=f"Re-render {what} from a result file.")
    p.add_argument("result", type=Path, help=result_help)
    p.add_argument("png", type=Path, help="where to write the chart")
    args = p.parse_args(argv)
    draw(json.loads(args.result.read_text()), args.png)
    print(args.png)
    return 0


def _any_chart(res: dict[str, Any], path: Path) -> None:
    if "servers" in res or "ceiling" in res:
        chart(res, path)
    else:
        chart_cpu_real(res, path)


def main(argv: Optional[list[str]] = None) -> int:
    return rerender(
        argv,
        "python -m benchmarks.chart",
        "the bench's chart",
        "a bench JSON, or a file of figures with its keys",
        _any_chart,
    )


if __name__ == "__main__":
    sys.exit(main())
