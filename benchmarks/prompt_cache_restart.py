"""TTFT of a known conversation's next turn after a restart: from the prompt cache's disk tier,
against a cold prefill of the same prompt. Run by hand:

    python -m benchmarks.prompt_cache_restart [--model demo] [--repeat 3] [--chars 3200]
                                              [--set KEY=VALUE ...]

Per repetition: an appliance with a fresh `models.prompt_cache_dir` answers turn 1 of a
conversation (a long system prompt) and stops (SIGTERM: its cache goes to disk); a second one on
the same folder answers turn 2 (timed: the disk tier, its files read back at load unless
`--set models.prompt_cache_preload_s=0`); a third with no disk tier answers the same turn 2
(timed: a cold prefill). Each timed request is its server's first after start, sent as soon as
it is ready; each server's seconds from start to ready are reported beside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .common import HOST, child_env, free_port, say
from .procs import Proc, wait_ready


def _serve(name: str, work: Path, model: str, extra: list[str]) -> tuple[Proc, str, float]:
    """A started appliance, its URL and its seconds from start to ready."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "appliance",
        f"server.port={port}",
        f"models.default={model}",
        f"models.auto_load=[{model}]",
        "logging.file=none",
        "rate_limits.inference=null",
        *extra,
    ]
    proc = Proc(name, argv, child_env(), work, work / f"{name}.log").start()
    url = f"http://{HOST}:{port}"
    ready = wait_ready(proc, url + "/readyz", timeout=300)
    return proc, url, ready


def _turn(url: str, model: str, messages: list[dict[str, str]]) -> tuple[str, float, int, int]:
    """Answer text, TTFT (s), prompt tokens and cached tokens of one streamed chat request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, ttft = "", None
    usage: dict[str, Any] = {}
    # The client is made before the clock starts: making one (its TLS context, with the CA
    # bundle read) took 27-52 ms of a 2-core CPU, which is the client's cost, not the server's.
    with httpx.Client(trust_env=False, timeout=600) as client:
        t0 = time.perf_counter()
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.read().decode(errors='replace')}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        ttft = ttft or time.perf_counter() - t0
                        text += piece
                usage = event.get("usage") or usage
    assert ttft is not None, "no text came back"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return text, ttft, int(usage.get("prompt_tokens", 0)), int(cached)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chars", type=int, default=3200, help="system prompt length")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every server (e.g. models.catalog.demo.demo_shape=llama-1b)",
    )
    args = ap.parse_args(argv)
    system = ("You are a coding agent. Tools: read_file(path), run_tests(), search(q). " * 200)[
        : args.chars
    ]
    warm, cold = [], []
    ups: list[tuple[float, float]] = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="pc-restart-") as tmp:
            work = Path(tmp)
            disk = [*args.set, f"models.prompt_cache_dir={work / 'cache'}"]
            first = [
                {"role": "system", "content": f"{i} {system}"},
                {"role": "user", "content": "What does the project do?"},
            ]
            proc, url, _ = _serve("turn1", work, args.model, disk)
            answer, _, p1, _ = _turn(url, args.model, first)
            proc.stop()
            second = [
                *first,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Run the tests."},
            ]
            proc, url, up_warm = _serve("disk", work, args.model, disk)
            _, t_warm, p2, cached = _turn(url, args.model, second)
            proc.stop()
            for line in (work / "disk.log").read_text(errors="replace").splitlines():
                if "from disk" in line:
                    say(line.strip())
            proc, url, up_cold = _serve("cold", work, args.model, list(args.set))
            _, t_cold, _, cold_cached = _turn(url, args.model, second)
            proc.stop()
            assert cold_cached == 0
            say(
                f"rep {i}: turn 1 {p1} tokens; turn 2 {p2} tokens, {cached} from disk: "
                f"TTFT {t_warm * 1000:.0f} ms vs cold {t_cold * 1000:.0f} ms; "
                f"ready {up_warm:.2f} s vs {up_cold:.2f} s after start"
            )
            warm.append(t_warm)
            cold.append(t_cold)
            ups.append((up_warm, up_cold))
    w, c = statistics.median(warm), statistics.median(cold)
    print(
        json.dumps(
            {
                "model": args.model,
                "prompt_tokens": p2,
                "cached_tokens": cached,
                "ttft_disk_s": round(w, 4),
                "ttft_cold_s": round(c, 4),
                "ratio": round(w / c, 3),
                "ready_disk_s": round(statistics.median(u for u, _ in ups), 3),
                "ready_cold_s": round(statistics.median(u for _, u in ups), 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
