"""The benchmark: the appliance side by side with mlx_lm.server and the bare engine.

    python -m benchmarks [--shape demo|llama-1b | --model-path DIR] [--concurrency 1,4,8]
                         [--max-tokens N] [--requests-per-client N] [--repeat 3]
                         [--out bench-results] [--skip-costs] [--no-chart] [--quick]
                         [--scenario auto|serving|cpu-real|all] [--llama-cpp-python PY]

Two scenarios (`--scenario`; auto runs both where MLX computes on the CPU, else serving): the
serving one below, and `cpu-real`, the real model (SmolLM2) on the CPU, the straightforward
load against the appliance's CPU path (benchmarks/cpu_real.py).

On one model and one machine, in one run:

- the ceiling: mlx_lm's BatchGenerator driven directly in a loop, no server, in a subprocess of
  its own (`--ceiling-worker`, driven over stdin); c prompts inserted at once, greedy, fixed
  max_tokens; on a GPU a second worker runs it under the appliance's MLX settings
  (engine/cuda.py's MLX_ENV_DEFAULTS, CUDA graphs off), and the faster of the two counts; on
  the CPU it runs with the BLAS the appliance arranges for itself (engine/cpu.py);
- mlx_lm.server and the appliance, both started once on loopback ports; for each repetition,
  for each concurrency, the ceiling, then mlx_lm.server, then the appliance take their turn (one
  at a time) with closed-loop streaming chat clients (asyncio + httpx; more than 16 clients are
  spread over client processes, `--clients-per-process`, so the client is not what limits);
  generated tokens are counted from the usage each stream reports (stream_options.include_usage);
- the appliance's own costs: 429 latency when busy, /healthz and /metrics latency under load,
  /metrics scrape time after many requests, RSS after load, cold start to /readyz 200.

`--agent` runs the agent-session scenario instead (benchmarks/agent.py) and `--constraints`
what grammar-constrained rows cost (benchmarks/constraints_cost.py).

Progress goes to stderr; the tables to stdout; JSON and a PNG chart to --out. Every process it
starts is stopped by PID (SIGTERM, then SIGKILL), also on Ctrl-C; all traffic is to 127.0.0.1.
The parts: scenarios (what is measured), peers (the servers and the ceiling), load (the
clients), costs, report (tables and targets), chart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from benchmarks.agent import add_agent_args, run_agent, wants_agent
from benchmarks.chart import chart, chart_cpu_real
from benchmarks.common import percentile, say
from benchmarks.costs import batch_joins, busy_rejection, metrics_after_requests, probe_stats
from benchmarks.load import CLIENT_POOL, TokenCounter, best_of, closed_loop, warm_up
from benchmarks.peers import Ceiling, ceiling_worker, start_appliance, start_mlx_server
from benchmarks.procs import Proc, Procs
from benchmarks.report import ceiling_median, evaluate, fmt_ms, machine_info, tables
from benchmarks.scenarios import APPLIANCE, CEILING_TRIES, MLX_SERVER, PROMPTS, SERVERS, Plan

# PROMPTS and percentile as appliance.bench had them, for other benchmarks to share.
__all__ = ["PROMPTS", "main", "parser", "percentile", "plan_from", "run"]


def _load_average() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _ceilings(plan: Plan, procs: Procs, work: Path) -> list[Ceiling]:
    """The ceiling worker; on a GPU, a second one under the appliance's MLX settings."""
    from appliance.engine.mlx_ext.cuda import MLX_ENV_DEFAULTS

    say("ceiling: BatchGenerator alone, in a subprocess (loading, warming up)")
    blas = _appliance_blas_env(plan)
    if blas is not None:
        # On the CPU the appliance multiplies with the BLAS it arranges: so does the engine
        # alone that bounds it (mlx_lm.server keeps the wheel's, as its users run it).
        ceiling = Ceiling(plan, procs, work, "the appliance's BLAS", blas)
    else:
        ceiling = Ceiling(plan, procs, work)
    say(f"ceiling ready on {ceiling.device}")
    # As the appliance sets them: where the environment already sets one, that value.
    own = {k: os.environ.get(k, v) for k, v in MLX_ENV_DEFAULTS.items()}
    if (
        "gpu" in ceiling.device.lower()
        and plan.second_ceiling
        and any(os.environ.get(k) != v for k, v in own.items())
    ):
        # The appliance runs MLX with its own settings (CUDA graphs off): the engine alone gets
        # them too, in a second worker (a second copy of the model in memory), and the better
        # of the two is the ceiling.
        say("ceiling: a second worker under the appliance's MLX settings")
        return [ceiling, Ceiling(plan, procs, work, "the appliance's MLX settings", own)]
    return [ceiling]


def _appliance_blas_env(plan: Plan) -> Optional[dict[str, str]]:
    """The BLAS environment the appliance under test arranges for itself (engine.cpu_blas and
    cpu_gemv_forward as --appliance-arg sets them), or None where it arranges none."""
    from appliance.engine import cpu

    settings = {"engine.cpu_blas": "auto", "engine.cpu_gemv_forward": "true"}
    for arg in plan.appliance_args:
        k, _, v = arg.lstrip("+").partition("=")
        if k in settings:
            settings[k] = v
    forward = settings["engine.cpu_gemv_forward"].lower() in ("true", "1", "yes")
    env = cpu.preload_env(settings["engine.cpu_blas"], forward, {})
    return env if env.get(cpu.PRELOAD_ENV) else None


def _ceiling_turn(
    ceilings: list[Ceiling], c: int, rep: int, repeat: int, out: list[dict[str, Any]]
) -> None:
    # The ceiling is an upper bound: each worker gets CEILING_TRIES batches per turn, best kept.
    for w in ceilings:
        for i in range(CEILING_TRIES):
            cr = w.run(c)
            cr["rep"] = rep + 1
            cr["warm"] = i > 0  # the first batch of a turn may meet new shapes
            cr["mlx_env"] = w.mlx_env
            cr["load_average_1m"] = _load_average()
            out.append(cr)
    tries = CEILING_TRIES * len(ceilings)
    best = max(out[-tries:], key=lambda r: r["tokens_per_s"])
    say(
        f"rep {rep + 1}/{repeat} c={c} ceiling: {best['tokens_per_s']:.1f} tok/s "
        f"(best of {tries}, {best['mlx_env']}), first token {best['ttft_s'] * 1000:.0f} ms"
    )


def _server_turn(
    plan: Plan,
    name: str,
    url: str,
    server: Proc,
    c: int,
    rep: int,
    probes: dict[str, list[float]],
    probe_fail: dict[str, int],
    counter: Optional[TokenCounter],
) -> dict[str, Any]:
    at_max = c == plan.cmax and plan.costs
    paths = ("/healthz", "/metrics") if name == APPLIANCE else ("/health",)
    joins0 = batch_joins(url) if name == APPLIANCE else None
    r = asyncio.run(
        closed_loop(url, c, plan, paths if at_max else (), probes, probe_fail, counter, server)
    )
    joins1 = batch_joins(url) if joins0 is not None else None
    if joins0 is not None and joins1 is not None:
        r["joins"], r["joined"] = joins1[0] - joins0[0], joins1[1] - joins0[1]
    r["rep"] = rep + 1
    r["load_average_1m"] = _load_average()
    err = f", {r['errors']} failed" if r["errors"] else ""
    joins = f", {r['joined']} requests in {r['joins']} joins" if r.get("joins") else ""
    say(
        f"rep {rep + 1}/{plan.repeat} c={c} {name}: {r['tokens_per_s']:.1f} tok/s, "
        f"TTFT p50 {fmt_ms(r['ttft_s_p50'])} p99 {fmt_ms(r['ttft_s_p99'])} ms, ITL p50 "
        f"{fmt_ms(r['itl_s_p50'])} ms, {r['ok']}/{r['requests']} ok{err}{joins}"
    )
    return r


def _ratios(res: dict[str, Any], plan: Plan) -> dict[str, dict[str, Optional[float]]]:
    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    out: dict[str, dict[str, Optional[float]]] = {}
    for c in plan.concurrency:
        k = str(c)
        a, m = res["servers"][APPLIANCE][k], res["servers"][MLX_SERVER][k]
        ceil = res["ceiling"]["best"][k]
        out[k] = {
            "vs_mlx": ratio(a["tokens_per_s"], m["tokens_per_s"]),
            "vs_ceiling": ratio(a["tokens_per_s"], ceil["tokens_per_s"]),
            "vs_ceiling_median": ratio(a["tokens_per_s"], ceil["tokens_per_s_median"]),
            "ttft_p99_vs_mlx": ratio(a["ttft_s_p99"], m["ttft_s_p99"]),
            "cpu_per_token_vs_mlx": (
                ratio(a["cpu_ms_per_token"], m["cpu_ms_per_token"])
                if a["cpu_ms_per_token"]
                else None
            ),
        }
    return out


def _costs(
    plan: Plan,
    procs: Procs,
    work: Path,
    app: Proc,
    app_url: str,
    mlx: Proc,
    cold: list[float],
    probes: dict[str, dict[str, list[float]]],
    probe_fail: dict[str, dict[str, int]],
) -> dict[str, Any]:
    costs: dict[str, Any] = {}
    costs["probes_during_load"] = {n: probe_stats(probes[n], probe_fail[n]) for n in SERVERS}
    costs["rss_after_load_bytes"] = {APPLIANCE: app.rss_bytes(), MLX_SERVER: mlx.rss_bytes()}
    say(
        "RSS after load: "
        + ", ".join(
            f"{n} {v / 2**20:.0f} MiB" for n, v in costs["rss_after_load_bytes"].items() if v
        )
    )
    procs.stop(mlx)  # not needed any more; frees a core for the cost measurements
    say(f"/metrics: sending {plan.metrics_requests} one-token requests to the appliance")
    m = costs["metrics_after_requests"] = asyncio.run(
        metrics_after_requests(app_url, plan.metrics_requests, "/metrics", "lmx", plan.timeout_s)
    )
    say(
        f"/metrics scrape: p50 {fmt_ms(m['p50_s'])} ms, p99 {fmt_ms(m['p99_s'])} ms, "
        f"{m['bytes']} bytes"
    )
    costs["appliance_rss_after_metrics_requests_bytes"] = app.rss_bytes()
    procs.stop(app)

    say("busy rejection: an appliance with max_running=1, max_queued=0")
    long_tokens = 1900
    busy, busy_url, cold1 = start_appliance(
        plan, procs, work, "appliance-busy", max_running=1, max_queued=0, max_tokens=long_tokens
    )
    cold.append(cold1)
    b = costs["busy_rejection"] = asyncio.run(
        busy_rejection(busy_url, plan.busy_requests, long_tokens, plan.timeout_s)
    )
    say(
        f"busy rejection: {b['rejected']} x 429, p99 {fmt_ms(b['p99_s'])} ms, "
        f"statuses {b['statuses']}"
    )
    procs.stop(busy)
    while len(cold) < plan.cold_starts:
        p, _, t = start_appliance(plan, procs, work, f"appliance-cold{len(cold)}")
        cold.append(t)
        procs.stop(p)
    say("cold starts to /readyz 200: " + ", ".join(f"{t:.2f} s" for t in cold))
    # Every start counts: the main appliance, the busy one, then extra starts if needed.
    costs["cold_start"] = {"samples_s": cold, "median_s": percentile(cold, 50)}
    return costs


def run(plan: Plan, procs: Procs, work: Path) -> dict[str, Any]:
    """One whole bench run; returns the result that main writes as JSON."""
    res: dict[str, Any] = {
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
        "machine": machine_info(),
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "targets_kind": "cpu" if plan.targets == "auto" else plan.targets,
        "targets": [],
    }
    if "serving" in plan.scenarios:
        _serving(plan, procs, work, res)
    if "cpu-real" in plan.scenarios:
        from benchmarks import cpu_real

        res["cpu_real"] = cpu_real.run(
            work,
            repeat=plan.cpu_repeat,
            decode_tokens=plan.cpu_decode_tokens,
            llama=cpu_real.llama_python(plan.llama_python),
            timeout=max(900.0, plan.timeout_s),
            say=say,
            appliance_args=tuple(plan.appliance_args),
        )
        res["targets"] += cpu_real.targets(res["cpu_real"])
    res["machine"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return res


def _serving(plan: Plan, procs: Procs, work: Path, res: dict[str, Any]) -> None:
    """The three side by side on the plan's model (res gains its figures and targets)."""
    say(f"model {plan.model_label} at {plan.model_path}")
    say(
        f"machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, "
        f"load average {res['machine']['load_average_start']}"
    )

    ceilings = _ceilings(plan, procs, work)
    device = ceilings[0].device
    res["targets_kind"] = (
        plan.targets
        if plan.targets != "auto"
        else ("accelerator" if "gpu" in device.lower() else "cpu")
    )

    say("starting the appliance")
    app, app_url, cold0 = start_appliance(plan, procs, work, "appliance")
    cold = [cold0]
    say(f"appliance ready in {cold0:.2f} s (pid {app.pid}, {app_url})")
    say("starting mlx_lm.server")
    mlx, mlx_url = start_mlx_server(plan, procs, work)
    say(f"mlx_lm.server up (pid {mlx.pid}, {mlx_url})")
    urls = {MLX_SERVER: mlx_url, APPLIANCE: app_url}
    procs_by_name = {MLX_SERVER: mlx, APPLIANCE: app}
    counter: Optional[TokenCounter] = None
    with contextlib.suppress(Exception):
        counter = TokenCounter(plan.model_path)

    for name in SERVERS:
        say(f"warm-up: {name}")
        asyncio.run(warm_up(urls[name], plan))

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        n: {str(c): [] for c in plan.concurrency} for n in SERVERS
    }
    probes: dict[str, dict[str, list[float]]] = {n: {} for n in SERVERS}
    probe_fail: dict[str, dict[str, int]] = {n: {} for n in SERVERS}
    ceil_runs: dict[str, list[dict[str, Any]]] = {str(c): [] for c in plan.concurrency}
    for rep in range(plan.repeat):
        for c in plan.concurrency:
            _ceiling_turn(ceilings, c, rep, plan.repeat, ceil_runs[str(c)])
            for name in SERVERS:
                time.sleep(0.3)  # let the other server settle
                runs[name][str(c)].append(
                    _server_turn(
                        plan,
                        name,
                        urls[name],
                        procs_by_name[name],
                        c,
                        rep,
                        probes[name],
                        probe_fail[name],
                        counter,
                    )
                )
    for w in ceilings:
        w.close(procs)
    res["ceiling"] = {
        "device": device,
        "runs": ceil_runs,
        "mlx_envs": [w.mlx_env for w in ceilings],
        "best": {
            c: {
                "tokens_per_s": max(r["tokens_per_s"] for r in rs),
                "mlx_env": max(rs, key=lambda r: r["tokens_per_s"])["mlx_env"],
                "tokens_per_s_median": ceiling_median(rs),
                "ttft_s": min(r["ttft_s"] for r in rs),
                "cpu_ms_per_token": min(r["cpu_ms_per_token"] for r in rs),
            }
            for c, rs in ceil_runs.items()
        },
    }
    res["runs"] = runs
    res["servers"] = {n: {c: best_of(rs) for c, rs in runs[n].items()} for n in SERVERS}
    res["ratios"] = _ratios(res, plan)
    res["costs"] = (
        _costs(plan, procs, work, app, app_url, mlx, cold, probes, probe_fail)
        if plan.costs
        else None
    )
    res["targets"] += [asdict(t) for t in evaluate(res, res["targets_kind"])]


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return sorted(set(vals))


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m benchmarks`."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument(
        "--shape",
        choices=("demo", "llama-1b"),
        default="demo",
        help="demo model shape, built on first use (default demo)",
    )
    p.add_argument(
        "--model-path", type=Path, help="any local model folder instead of the demo model"
    )
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 8], help="e.g. 1,4,8 (default)")
    p.add_argument(
        "--max-tokens", type=int, help="tokens per request (default 64; 128 for llama-1b)"
    )
    p.add_argument(
        "--requests-per-client",
        type=int,
        default=8,
        help="requests each closed-loop client sends per run (default 8)",
    )
    p.add_argument(
        "--min-requests",
        type=int,
        default=8,
        help="requests a run sends at least: at low concurrency each client sends more "
        "than --requests-per-client (default 8; 0 turns it off)",
    )
    p.add_argument("--repeat", type=int, default=3, help="repetitions; best of (default 3)")
    p.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="folder for JSON and PNG"
    )
    p.add_argument("--skip-costs", action="store_true", help="only throughput and latency")
    p.add_argument("--no-chart", action="store_true", help="no PNG")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short sanity run: repeat 1, 2 requests per client, small cost counts",
    )
    p.add_argument(
        "--metrics-requests",
        type=int,
        default=10_000,
        help="requests before timing /metrics (default 10000)",
    )
    p.add_argument(
        "--busy-requests", type=int, default=200, help="429 requests timed (default 200)"
    )
    p.add_argument("--cold-starts", type=int, default=3, help="appliance starts timed (default 3)")
    p.add_argument(
        "--targets",
        choices=("auto", "cpu", "accelerator"),
        default="auto",
        help="which targets: cpu (the demo model) or accelerator (the 1B shape); "
        "auto by MLX device",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s")
    p.add_argument(
        "--probe-interval",
        type=float,
        default=0.1,
        help="seconds between /healthz + /metrics probes during the top load",
    )
    p.add_argument(
        "--appliance-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for the appliance (repeatable)",
    )
    p.add_argument(
        "--mlx-server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for mlx_lm.server (repeatable, e.g. "
        "--mlx-server-arg=--prefill-step-size=512)",
    )
    p.add_argument(
        "--clients-per-process",
        type=int,
        default=16,
        help="more clients than this are spread over client processes (default 16)",
    )
    p.add_argument(
        "--one-ceiling",
        action="store_true",
        help="on a GPU, no second ceiling worker under the appliance's MLX settings "
        "(it holds a second copy of the model)",
    )
    p.add_argument(
        "--scenario",
        choices=("auto", "serving", "cpu-real", "all"),
        default="auto",
        help="serving: the three side by side on the demo model; cpu-real: SmolLM2 (the real "
        "model) on the CPU, the straightforward load against the appliance's CPU path; all: "
        "both; auto (default): all when MLX computes on the CPU, else serving",
    )
    p.add_argument(
        "--cpu-repeat",
        type=int,
        default=3,
        help="cpu-real: rounds per contender, best of (default 3; 1 with --quick)",
    )
    p.add_argument(
        "--cpu-decode-tokens",
        type=int,
        default=64,
        help="cpu-real: tokens decoded per round (default 64)",
    )
    p.add_argument(
        "--llama-cpp-python",
        metavar="PYTHON",
        help="cpu-real: a Python with llama_cpp installed, for llama.cpp on the same file as a "
        "peer (default: this Python, if it has llama_cpp)",
    )
    p.add_argument("--ceiling-worker", action="store_true", help=argparse.SUPPRESS)
    add_agent_args(p)
    p.add_argument(
        "--constraints",
        action="store_true",
        help="instead: what grammar-constrained rows cost (the per-token mask, and unconstrained "
        "streams' decode speed beside constrained ones); benchmarks/constraints_cost.py",
    )
    return p


def plan_from(args: argparse.Namespace) -> Plan:
    """The run's plan from parsed arguments; builds the demo model first if it is the one."""
    if args.model_path is not None:
        path = args.model_path.expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model-path {path}: no config.json there")
        label = path.name
    else:
        from appliance.engine.demo import ensure_demo_model

        say(f"demo model ({args.shape}): building it if missing")
        path = ensure_demo_model(shape=args.shape, progress=say)
        label = f"demo model ({args.shape})"
    big = args.shape == "llama-1b" and args.model_path is None
    max_tokens = args.max_tokens or (128 if big else 64)
    rpc, repeat, min_requests = args.requests_per_client, args.repeat, args.min_requests
    metrics_n, busy_n, colds = args.metrics_requests, args.busy_requests, args.cold_starts
    if args.quick:
        rpc, repeat, min_requests = min(rpc, 2), 1, min(min_requests, 2)
        metrics_n, busy_n, colds = min(metrics_n, 500), min(busy_n, 50), 1
    for name, v in (
        ("--max-tokens", max_tokens),
        ("--requests-per-client", rpc),
        ("--repeat", repeat),
        ("--metrics-requests", metrics_n),
        ("--busy-requests", busy_n),
        ("--cold-starts", colds),
        ("--clients-per-process", args.clients_per_process),
    ):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1")
    if min_requests < 0:
        raise SystemExit("--min-requests must be >= 0")
    scenarios: tuple[str, ...]
    if args.scenario == "auto":
        from appliance.engine.cpu import mlx_on_cpu

        scenarios = ("serving", "cpu-real") if mlx_on_cpu() else ("serving",)
    elif args.scenario == "all":
        scenarios = ("serving", "cpu-real")
    else:
        scenarios = (args.scenario,)
    cpu_repeat = 1 if args.quick else args.cpu_repeat
    if cpu_repeat < 1 or args.cpu_decode_tokens < 2:
        raise SystemExit("--cpu-repeat must be >= 1 and --cpu-decode-tokens >= 2")
    return Plan(
        model_path=path,
        model_label=label,
        concurrency=args.concurrency,
        max_tokens=max_tokens,
        requests_per_client=rpc,
        repeat=repeat,
        out=args.out,
        costs=not args.skip_costs,
        chart=not args.no_chart,
        metrics_requests=metrics_n,
        busy_requests=busy_n,
        cold_starts=colds,
        targets=args.targets,
        timeout_s=args.timeout,
        probe_interval_s=args.probe_interval,
        appliance_args=list(args.appliance_arg),
        mlx_server_args=list(args.mlx_server_arg),
        clients_per_process=args.clients_per_process,
        second_ceiling=not args.one_ceiling,
        min_requests=min_requests,
        scenarios=scenarios,
        cpu_repeat=cpu_repeat,
        cpu_decode_tokens=args.cpu_decode_tokens,
        llama_python=args.llama_cpp_python,
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        # As SIGINT: asyncio.run then cancels its task cleanly instead of dying mid-callback.
        os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGTERM, handler)
    # Started in the background by a non-interactive shell, the bench inherits SIGINT ignored:
    # the SIGINT above would then do nothing (and asyncio.run would not handle it).
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the bench (or, with --ceiling-worker, be the ceiling's worker); the exit status."""
    args = parser().parse_args(argv)
    if args.ceiling_worker:
        ceiling_worker(str(args.model_path), args.concurrency, args.max_tokens)
        return 0
    if wants_agent(args):
        return run_agent(args)
    if args.constraints:
        from benchmarks import constraints_cost

        stamp = time.strftime("%Y%m%d-%H%M%S")
        constraints_cost.main(["--json", str(args.out / f"bench-constraints-{stamp}.json")])
        return 0
    plan = plan_from(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="appliance-bench-") as tmp:
        try:
            res = run(plan, procs, Path(tmp))
        except KeyboardInterrupt:
            say("interrupted; stopping every process the bench started")
            return 130
        finally:
            try:
                procs.stop_all()
            finally:
                CLIENT_POOL.close()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = tables(res)
    res["table_markdown"] = text
    json_path = plan.out / f"bench-{stamp}.json"
    res["chart"] = None
    if plan.chart:
        png = plan.out / f"bench-{stamp}.png"
        try:
            if "servers" in res:
                chart(res, png)
                res["chart"] = str(png)
            if "cpu_real" in res:
                cpu_png = plan.out / f"bench-{stamp}-cpu-real.png"
                chart_cpu_real(res, cpu_png)
                res["chart_cpu_real"] = str(cpu_png)
        except Exception as exc:  # no matplotlib, no fonts: the figures matter more than the PNG
            say(f"no chart: {type(exc).__name__}: {exc}")
    json_path.write_text(json.dumps(res, indent=2, default=str))
    print(text)
    print(f"\nJSON: {json_path}")
    for key in ("chart", "chart_cpu_real"):
        if res.get(key):
            print(f"chart: {res[key]}")
    return 0
