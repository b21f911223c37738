"""Shared by the accelerator scripts: the median decode step of a BatchGenerator class, the
mean time of an evaluated MLX call, a timeline of calls to wrapped methods, and one request
through an in-process engine."""

import statistics
import time
from typing import Any, Callable, Optional

import mlx.core as mx

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


def per_call_ms(fn: Callable[[], Any], n: int = 100, warm: int = 10) -> float:
    """Mean ms of `fn()` evaluated, over `n` calls after `warm` untimed ones."""
    for _ in range(warm):
        mx.eval(fn())
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    return 1000 * (time.perf_counter() - t) / n


def median_step_ms(
    model: Any,
    cls: Any,
    batch: int,
    steps: int,
    warm: int = 20,
    check: Optional[Callable[[Any], None]] = None,
    prompts: Optional[list[list[int]]] = None,
    warm_tokens: Optional[list[int]] = None,
) -> float:
    """`batch` same-length prompts (or `prompts`) in a fresh `cls`, `warm` untimed next() calls
    (their tokens, in uid order per call, appended to `warm_tokens`), `check(gen)`, then the median
    of `steps` timed ones, in ms."""
    g = cls(
        model,
        stop_tokens=[[10**9]],
        completion_batch_size=64,
        prefill_batch_size=64,
        stream=mx.default_stream(mx.default_device()),
    )
    prompts = prompts or [PROMPT] * batch
    g.insert(prompts, max_tokens=[steps + 100] * len(prompts))
    for _ in range(warm):
        responses = g.next()[1]
        if warm_tokens is not None:
            warm_tokens += [tok for _, tok in sorted((r.uid, r.token) for r in responses)]
    if check is not None:
        check(g)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        g.next()
        out.append(1000 * (time.perf_counter() - t))
    g.close()
    return statistics.median(out)


class Timeline:
    """Calls to wrapped methods, each as (ms from `start`, ms it took, name, info about it)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, float, str, str]] = []
        self.start = 0.0

    def restart(self) -> None:
        self.events.clear()
        self.start = time.perf_counter()

    def wrap(
        self, owner: Any, attr: str, name: str, info: Optional[Callable[[Any], str]] = None
    ) -> None:
        """Time every call of `owner.attr` (a method, or a module's function when `info` is
        None); `info(self_of_the_call)` describes a method's object after the call."""
        inner: Callable[..., Any] = getattr(owner, attr)
        timeline = self

        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            t1 = time.perf_counter()
            what = info(args[0]) if info is not None else ""
            timeline.events.append((1000 * (t0 - timeline.start), 1000 * (t1 - t0), name, what))
            return out

        setattr(owner, attr, call)


async def run_request(
    engine: Any,
    model: Any,
    prompt: list[int],
    max_tokens: int,
    on_tokens: Optional[Callable[[list[int]], None]] = None,
) -> list[int]:
    """One request through an in-process Engine, to its end: its tokens. `on_tokens(new)` is
    called at each step that gave some (time stamps, a first-token event)."""
    from appliance.engine.types import SamplingParams

    gen = await engine.start(model, prompt, SamplingParams(max_tokens=max_tokens))
    deadline, tokens = engine.deadline(), []
    while True:
        new, _ = await gen.next_tokens(deadline)
        if not new:
            break
        tokens.extend(new)
        if on_tokens is not None:
            on_tokens(new)
    engine.finish(gen)
    return tokens
