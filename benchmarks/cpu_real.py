"""The real model on the CPU: the straightforward load against the appliance's CPU path.

    python -m benchmarks --scenario cpu-real [--cpu-repeat 3] [--llama-cpp-python PY]

SmolLM2-135M-Instruct, the Q4_1 GGUF file of `builtin:smollm2`, one sequence, greedy, on the
same prompt (about 120 tokens) and the same number of decoded tokens, in one run:

- **straightforward**: the file loaded as stored (quantized layers packed, floats in float32)
  with the mlx wheel's own BLAS, in a subprocess without LD_PRELOAD: what a user who loads the
  model with MLX gets. Prefill is one forward pass over the prompt on a fresh cache; decode is
  mlx-lm's `generate_step`, no server.
- **appliance**: a real appliance (`python -m appliance`) with its own choices (engine.cpu_blas
  and cpu_weights at auto), over HTTP: prefill is the time to the first token of a one-token
  completion of the prompt (a different first token each time, so the prompt cache cannot
  help); decode is the token rate of a streamed completion after its first token, end of
  sequence banned through logit_bias so it runs to max_tokens.
- **appliance engine**: the same bare loop as the straightforward load, in a subprocess under
  the environment and weight plan the appliance chooses (no HTTP): where the appliance's own
  overhead shows.
- **llama.cpp** (optional, `--llama-cpp-python PY`, a Python with `llama_cpp` installed, or this
  one if it has it): llama-cpp-python on the same file, with as many threads as cores.

The contenders take turns round by round (`repeat` rounds; each worker a fresh subprocess, warmed
up with a short prompt first); the best of each figure counts. Ratios are appliance /
straightforward. The worker modes (`--worker stored|appliance|llama`) print one JSON object;
the llama worker imports only the standard library and llama_cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

# About 120 tokens of plain English (cut to exactly PROMPT_TOKENS by each tokenizer).
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how books were made, sold and read across Europe. Before it, every copy of a book "
    "was written by hand, and a large volume could take a scribe many months. Printers in "
    "Mainz, Venice and Paris soon produced thousands of pages a day, and the price of books "
    "fell so far that merchants, students and craftsmen could own them. Scholars argue about "
    "how quickly ideas spread as a result, but few doubt that the press changed the speed of "
    "learning, the shape of religion and the growth of science in the centuries that followed."
)
PROMPT_TOKENS = 120
DECODE_TOKENS = 64
TARGETS = {"prefill": 20.0, "decode": 2.0}  # appliance / straightforward, tokens per second


def _best(xs: list[float]) -> Optional[float]:
    return max(xs) if xs else None


# -- workers (subprocesses)


def _mlx_worker(mode: str, model_file: str, repeat: int, decode_tokens: int) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from appliance.engine import cpu, gguf

    t = time.perf_counter()
    cache_dir = gguf.default_cache_dir(None)
    if mode == "stored":
        model, tok = gguf.load(model_file, cache_dir=cache_dir)
        weights = "as stored (quantized), floats in float32"
    else:
        from appliance.engine.loading import load_model, weight_plan
        from appliance.engine.mlx_ext import fusion

        plan = weight_plan(Path(model_file), "auto")[0]
        model, tok = load_model("smollm2", Path(model_file), builtin_dir=None, plan=plan)
        if fusion.usable():
            fusion.fuse_projections(model)
        weights = plan.summary()
    load_s = time.perf_counter() - t
    ids = tok.encode(PROMPT_TEXT, add_special_tokens=False)[:PROMPT_TOKENS]
    prefill: list[float] = []
    decode: list[float] = []
    greedy = lambda x: mx.argmax(x, axis=-1)  # noqa: E731
    # Warm-up, untimed: a short prefill and a few decode steps, so kernels and buffers exist.
    warm = generate_step(mx.array(ids[:16]), model, max_tokens=4, sampler=lambda x: x.argmax(-1))
    for _ in warm:
        pass
    for i in range(1, repeat + 1):
        prompt = [ids[0] + i, *ids[1:]]  # a different first token each round
        cache = make_prompt_cache(model)
        t = time.perf_counter()
        mx.eval(model(mx.array([prompt]), cache=cache))
        p = len(prompt) / (time.perf_counter() - t)
        steps = generate_step(mx.array(prompt), model, max_tokens=decode_tokens + 1, sampler=greedy)
        next(steps)  # the prefill and the first token
        t = time.perf_counter()
        n = sum(1 for _ in steps)
        decode.append(n / (time.perf_counter() - t))
        prefill.append(p)
    return {
        "prompt_tokens": len(ids),
        "decode_tokens": decode_tokens,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "load_s": load_s,
        "weights": weights,
        "blas": cpu.current().line(),
        "device": str(mx.default_device()),
    }


def _llama_worker(model_file: str, repeat: int, decode_tokens: int) -> dict[str, Any]:
    import llama_cpp

    threads = os.cpu_count() or 1
    t = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=model_file, n_ctx=1024, n_batch=512, n_threads=threads, verbose=False
    )
    load_s = time.perf_counter() - t
    ids = llm.tokenize(PROMPT_TEXT.encode(), add_bos=False)[:PROMPT_TOKENS]
    prefill: list[float] = []
    decode: list[float] = []
    llm.eval(ids[:16])  # warm-up, untimed
    for i in range(1, repeat + 1):
        prompt = [ids[0] + i, *ids[1:]]
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        p = len(prompt) / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            logits = llm.scores[llm.n_tokens - 1]
            llm.eval([int(logits.argmax())])
        decode.append(decode_tokens / (time.perf_counter() - t))
        prefill.append(p)
    return {
        "prompt_tokens": len(ids),
        "decode_tokens": decode_tokens,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "load_s": load_s,
        "threads": threads,
        "version": getattr(llama_cpp, "__version__", "?"),
    }


def _run_worker(
    python: str, args: list[str], env: dict[str, str], timeout: float
) -> dict[str, Any]:
    r = subprocess.run(
        [python, str(Path(__file__).resolve()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise RuntimeError(f"worker {args[:2]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def _stripped_env() -> dict[str, str]:
    """This environment without anything the appliance's BLAS arrangement adds."""
    from appliance.engine import cpu
    from benchmarks.common import child_env

    env = child_env()
    env.pop(cpu.MARKER_ENV, None)
    env.pop(cpu.PRELOAD_ENV, None)
    return env


# -- the appliance over HTTP


def _appliance_http(
    url: str, ids: list[int], rounds: range, decode_tokens: int, eos: list[int], timeout: float
) -> dict[str, Any]:
    """Rounds over HTTP; round 0 warms up (untimed)."""
    import httpx

    prefill: list[float] = []
    decode: list[float] = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for i in rounds:
            prompt = [ids[0] + 1 + i, *ids[1:]]
            body = {"model": "smollm2", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            t = time.perf_counter()
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            p = len(prompt) / (time.perf_counter() - t)
            prompt = [ids[0] + 101 + i, *ids[1:]]
            body = {
                "model": "smollm2",
                "prompt": prompt,
                "max_tokens": decode_tokens + 1,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": {str(e): -100 for e in eos},
            }
            first: Optional[float] = None
            tokens = 0
            with client.stream("POST", "/v1/completions", json=body) as s:
                s.raise_for_status()
                for line in s.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens = int(event["usage"]["completion_tokens"])
                    elif event.get("choices") and first is None:
                        first = time.perf_counter()
            end = time.perf_counter()
            d = (tokens - 1) / (end - first) if first is not None and tokens > 1 else 0.0
            if i:
                prefill.append(p)
                decode.append(d)
    return {
        "prompt_tokens": len(ids),
        "decode_tokens": decode_tokens,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
    }


def _start_appliance(
    procs: Any, work: Path, timeout: float, extra: tuple[str, ...] = ()
) -> tuple[Any, str, float]:
    from benchmarks.common import HOST, free_port
    from benchmarks.procs import Proc, wait_ready

    port = free_port()
    home = work / "appliance-cpu-real"
    home.mkdir(parents=True, exist_ok=True)
    env = _stripped_env()  # the appliance arranges its own
    env.update({"XDG_STATE_HOME": str(home / "state"), "PYTHONUNBUFFERED": "1"})
    for key in ("LMX_ADMIN_KEY", "LMX_API_KEYS"):
        env.pop(key, None)
    argv = [
        sys.executable,
        "-m",
        "appliance",
        f"++server.port={port}",
        f"++server.host={HOST}",
        "++server.drain_timeout_s=5",
        "++models.default=smollm2",
        "++models.auto_load=[smollm2]",
        "++rate_limits.inference=null",
        "++logging.file=none",
        *extra,
    ]
    proc = procs.add(Proc("appliance-cpu-real", argv, env, home, home / "server.log"))
    proc.start()
    url = f"http://{HOST}:{port}"
    cold = wait_ready(proc, url + "/readyz", timeout=timeout)
    return proc, url, cold


def _blas_line(log: Path) -> Optional[str]:
    try:
        for line in log.read_text(errors="replace").splitlines():
            if "CPU BLAS:" in line:
                i = line.index("CPU BLAS:")
                return line[i:].split('"', 1)[0].rstrip()
    except OSError:
        pass
    return None


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    return {
        **r,
        "prefill_best_tok_s": _best(r["prefill_tok_s"]),
        "decode_best_tok_s": _best(r["decode_tok_s"]),
    }


def llama_python(given: Optional[str]) -> Optional[str]:
    """The Python that runs the llama.cpp peer: `given`, or this one if it has llama_cpp."""
    if given:
        return given
    import importlib.util

    return sys.executable if importlib.util.find_spec("llama_cpp") else None


def run(
    work: Path,
    *,
    repeat: int = 3,
    decode_tokens: int = DECODE_TOKENS,
    llama: Optional[str] = None,
    timeout: float = 900.0,
    say: Any = print,
    appliance_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The whole scenario; returns its JSON section (see the module's doc). `appliance_args`
    (KEY=VALUE) go to the appliance; engine.cpu_blas and engine.cpu_gemv_forward among them
    set the engine path's environment too."""
    from appliance.engine import cpu
    from appliance.engine.builtin import fetch_smollm2
    from benchmarks.procs import Procs

    model_file = str(fetch_smollm2(progress=say))
    res: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct Q4_1 (builtin:smollm2)",
        "file": model_file,
        "repeat": repeat,
        "targets": TARGETS,
    }
    worker = ["--model-file", model_file, "--repeat", "1", "--decode-tokens", str(decode_tokens)]
    settings = {"engine.cpu_blas": "auto", "engine.cpu_gemv_forward": "true"}
    for arg in appliance_args:
        k, _, v = arg.lstrip("+").partition("=")
        if k in settings:
            settings[k] = v
    forward = settings["engine.cpu_gemv_forward"].lower() in ("true", "1", "yes")
    engine_env = cpu.preload_env(settings["engine.cpu_blas"], forward, _stripped_env())
    res["appliance_args"] = list(appliance_args)
    rounds: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("straightforward", "appliance", "appliance_engine", "llama_cpp")
    }
    procs = Procs()
    try:
        say("cpu-real: starting an appliance on SmolLM2 (its own BLAS and weights)")
        app, url, cold = _start_appliance(procs, work, timeout, tuple(appliance_args))
        ids = _prompt_ids(model_file)
        eos = [0, 2]  # SmolLM2's <|endoftext|> and <|im_end|>
        _appliance_http(url, ids, range(0, 1), 4, eos, timeout)  # warm-up
        # The contenders take turns, round by round, so that a busy spell of the machine
        # falls on all of them.
        for r in range(1, repeat + 1):
            say(f"cpu-real round {r}/{repeat}: the straightforward load (a subprocess)")
            got = _run_worker(
                sys.executable, ["--worker", "stored", *worker], _stripped_env(), timeout
            )
            rounds["straightforward"].append(got)
            say(f"cpu-real round {r}/{repeat}: the appliance over HTTP")
            http = _appliance_http(url, ids, range(r, r + 1), decode_tokens, eos, timeout)
            rounds["appliance"].append(http)
            say(f"cpu-real round {r}/{repeat}: the appliance's engine path (a subprocess)")
            eng = _run_worker(
                sys.executable, ["--worker", "appliance", *worker], engine_env, timeout
            )
            rounds["appliance_engine"].append(eng)
            if llama:
                try:
                    lc = _run_worker(
                        llama, ["--worker", "llama", *worker], _stripped_env(), timeout
                    )
                    rounds["llama_cpp"].append(lc)
                except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
                    say(f"cpu-real: the llama.cpp peer failed: {exc}")
                    llama = None
            for name in ("straightforward", "appliance", "appliance_engine", "llama_cpp"):
                if rounds[name]:
                    last = rounds[name][-1]
                    say(
                        f"cpu-real round {r} {name}: prefill {last['prefill_tok_s'][0]:.1f} "
                        f"tok/s, decode {last['decode_tok_s'][0]:.1f} tok/s"
                    )
        res["appliance_cold_start_s"] = cold
        res["appliance_blas"] = _blas_line(app.log_path)
    finally:
        procs.stop_all()
    for name, rs in rounds.items():
        if not rs:
            res[name] = None
            continue
        merged = {k: v for k, v in rs[0].items() if k not in ("prefill_tok_s", "decode_tok_s")}
        merged["prefill_tok_s"] = [x for r in rs for x in r["prefill_tok_s"]]
        merged["decode_tok_s"] = [x for r in rs for x in r["decode_tok_s"]]
        res[name] = _summary(merged)
    res["appliance"]["blas"] = res.get("appliance_blas")
    res["ratios"] = ratios(res)
    return res


def _prompt_ids(model_file: str) -> list[int]:
    """The prompt's token ids as the appliance's tokenizer makes them."""
    from appliance.engine.gguf import default_cache_dir
    from appliance.engine.gguf.loader import convert

    folder = convert(model_file, default_cache_dir(None))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return list(tok.encode(PROMPT_TEXT, add_special_tokens=False).ids[:PROMPT_TOKENS])


def ratios(res: dict[str, Any]) -> dict[str, Optional[float]]:
    """appliance / straightforward (and the engine path's, and llama.cpp / appliance), by figure."""
    out: dict[str, Optional[float]] = {}
    base = res.get("straightforward") or {}
    for who in ("appliance", "appliance_engine", "llama_cpp"):
        r = res.get(who) or {}
        for fig in ("prefill", "decode"):
            a, b = r.get(f"{fig}_best_tok_s"), base.get(f"{fig}_best_tok_s")
            out[f"{who}_{fig}"] = a / b if a and b else None
    return out


def table(res: dict[str, Any]) -> str:
    """The scenario's Markdown table."""
    base = res["straightforward"]
    rows = [
        ("straightforward load (as stored, wheel's BLAS)", base),
        ("appliance, over HTTP", res.get("appliance")),
        ("appliance's engine path, no HTTP", res.get("appliance_engine")),
        ("llama.cpp (llama-cpp-python)", res.get("llama_cpp")),
    ]
    args = res.get("appliance_args") or []
    lines = [
        f"SmolLM2-135M-Instruct Q4_1 on the CPU, one sequence, {base['prompt_tokens']}-token "
        f"prompt, {base['decode_tokens']} decoded tokens; tokens/s, best of {res['repeat']}"
        + (f"; appliance overrides: {' '.join(args)}" if args else ""),
        "",
        "| | prefill tok/s | x straightforward | decode tok/s | x straightforward |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        if not r:
            continue
        cells = [label]
        for fig in ("prefill", "decode"):
            v, b = r.get(f"{fig}_best_tok_s"), base.get(f"{fig}_best_tok_s")
            cells += [f"{v:,.1f}" if v else "-", f"{v / b:.1f}x" if v and b else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    rat = res.get("ratios") or {}
    verdicts = []
    for fig, want in TARGETS.items():
        got = rat.get(f"appliance_{fig}")
        ok = got is not None and got >= want
        shown = f"{got:.1f}x" if got is not None else "n/a"
        verdicts.append(f"{fig} >= {want:g}x: {shown} {'met' if ok else 'NOT met'}")
    lines += ["", "Targets (appliance / straightforward): " + "; ".join(verdicts)]
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The scenario's targets, as rows of the report's target table."""
    out = []
    for fig, want in TARGETS.items():
        got = (res.get("ratios") or {}).get(f"appliance_{fig}")
        out.append(
            {
                "name": f"cpu-real {fig} tokens/s, appliance / straightforward load",
                "value": got,
                "target": f">= {want:g}x",
                "passed": None if got is None else got >= want,
            }
        )
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="cpu-real scenario worker")
    p.add_argument("--worker", choices=("stored", "appliance", "llama"), required=True)
    p.add_argument("--model-file", required=True)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    a = p.parse_args(argv)
    if a.worker == "llama":
        out = _llama_worker(a.model_file, a.repeat, a.decode_tokens)
    else:
        out = _mlx_worker(a.worker, a.model_file, a.repeat, a.decode_tokens)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
