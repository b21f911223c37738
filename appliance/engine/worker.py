"""The generation thread of one loaded model, around mlx_lm's BatchGenerator.

Everything MLX happens on this thread (streams belong to the thread that made them): load,
prefill, decode, embeddings and memory estimates. Requests join the running batch between
steps and leave it when finished or cancelled. Each decode step is handed to the event loop
in one `call_soon_threadsafe`, not one per token per request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Optional

from ..errors import EngineFailure
from . import cuda
from .memory import on_cuda
from .types import Generation, SamplingParams, TopLogprob

log = logging.getLogger("appliance.engine")

_STOP = object()
# An ended sequence counts as a client about to come back (see the join window) this long.
RETURN_S = 0.5
# While the HTTP front holds requests on their way to the engine (arrivals.py), a waiting
# request waits for them this long at most (join_window_s if longer), looking every POLL_S.
ARRIVING_WAIT_S = 0.1
POLL_S = 0.002
# An idle engine that nobody is expected back to waits this long after the latest arrival for
# another (up to ARRIVING_WAIT_S in all): a burst reaches the front over several loop turns, and
# requests still in the sockets are in no count.
SETTLE_S = 0.005


def _make_sampler(p: SamplingParams) -> Optional[Callable[[Any], Any]]:
    """None for greedy (the batch then shares one argmax), else mlx_lm's sampler chain."""
    if p.greedy:
        return None
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

    if p.seed is None:
        return make_sampler(temp=p.temperature, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k)
    # A seeded request draws from its own key, so its output repeats whatever else runs.
    state = {"key": mx.random.key(p.seed)}

    def seeded(logprobs: Any) -> Any:
        if 0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        key, sub = mx.random.split(state["key"])
        state["key"] = key
        return mx.random.categorical(logprobs * (1 / p.temperature), key=sub)

    return seeded


def _make_processors(p: SamplingParams) -> list[Any]:
    if not (p.logit_bias or p.repetition_penalty or p.presence_penalty or p.frequency_penalty):
        return []
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(
        logit_bias=dict(p.logit_bias) if p.logit_bias else None,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
    )


def batching(spec: Any) -> dict[str, Any]:
    """A catalog entry's batching settings (and projection fusion) as ModelWorker takes them."""
    return {
        "prefill_step_size": spec.prefill_step_size,
        "completion_batch_size": spec.completion_batch_size,
        "prefill_batch_size": spec.prefill_batch_size or spec.completion_batch_size,
        "max_kv_size": spec.max_kv_size,
        "join_window_s": spec.join_window_s,
        "fast_joins": spec.fast_joins,
        "fuse_projections": spec.fuse_projections,
    }


def empty_stats() -> dict[str, int]:
    """A worker's counters before any request: prompt cache use and joins (see metrics.py)."""
    return {"cache_hits": 0, "cache_misses": 0, "cached_tokens": 0, "joins": 0, "joined": 0}


class WorkerThread:
    """What every kind of worker shares: a thread that loads the model, then serves it; `start`
    waits for the load. Subclasses set `_thread`, `_loaded` and `dead`."""

    _thread: threading.Thread
    _loaded: Future[None]
    dead: Optional[BaseException]

    async def start(self) -> None:
        """Start the thread and wait until the model is loaded; raises the load error."""
        self._thread.start()
        await asyncio.wrap_future(self._loaded)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None


class ModelWorker(WorkerThread):
    """Owns one model on its own thread; the registry talks to it through `submit` and `call`."""

    def __init__(
        self,
        name: str,
        path: str,
        *,
        loader: Callable[[], tuple[Any, Any]],
        loop: asyncio.AbstractEventLoop,
        prefill_step_size: int,
        completion_batch_size: int,
        prefill_batch_size: int,
        max_kv_size: Optional[int],
        prompt_cache_bytes: int,
        prompt_cache_min_tokens: Optional[int] = 0,
        join_window_s: float = 0.0,
        fast_joins: bool = False,
        fuse_projections: bool = False,
        unfused_attention_elements: int = 0,
        decode_kernel: bool = False,
        on_death: Optional[Callable[[str, BaseException], None]] = None,
        link: Any = None,
        arriving: Callable[[], int] = lambda: 0,
    ) -> None:
        self.name = name
        self.path = path
        self._loader = loader
        self._loop = loop
        self._prefill_step_size = prefill_step_size
        self._completion_batch_size = completion_batch_size
        self._prefill_batch_size = prefill_batch_size
        self._max_kv_size = max_kv_size
        self._prompt_cache_bytes = prompt_cache_bytes
        self._prompt_cache_min_tokens = prompt_cache_min_tokens  # None: by backend, at load
        self._join_window_s = join_window_s
        self._fast_joins = fast_joins  # see batching.py
        self._fuse_projections = fuse_projections  # see fusion.py
        self._unfused_attention_elements = unfused_attention_elements  # CUDA only, see cuda.py
        self._decode_kernel = decode_kernel  # CUDA only, see cuda.py
        self._on_death = on_death
        self._link = link  # distributed.Link on rank 0 of a group, else None
        self._arriving = arriving  # requests the HTTP front holds on their way here (arrivals.py)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._active: dict[int, Generation] = {}
        # Submitted, not in the batch yet (the join window), with the time each arrived.
        self._waiting: list[tuple[Generation, float]] = []
        self._thread = threading.Thread(target=self._run, name=f"gen-{name}", daemon=True)
        self._loaded: Future[None] = Future()
        self.model: Any = None
        self.tokenizer: Any = None
        self.prompt_cache: Any = None
        self.stats = empty_stats()
        self.dead: Optional[BaseException] = None
        self.vocab_size = 0

    # -- lifecycle (called from the event loop)
    @property
    def active_count(self) -> int:
        return len(self._active) + len(self._waiting)

    def submit(self, gen: Generation) -> None:
        """Queue a generation to join the batch at the next step."""
        if not self.alive:
            gen.fail(EngineFailure(f"model {self.name!r} is not running"))
            return
        gen._cancel = lambda: self._inbox.put(("cancel", gen))
        self._inbox.put(("submit", gen))

    def call(self, fn: Callable[[Any, Any], Any]) -> Future[Any]:
        """Run fn(model, tokenizer) on the generation thread between steps (embeddings, ...)."""
        fut: Future[Any] = Future()
        self._inbox.put(("call", fn, fut))
        return fut

    def inject_fault(self, exc: BaseException) -> None:
        """Testing only (reached through APPLIANCE_FAULT_INJECTION=1, never by default): make the
        generation thread raise `exc` between steps, as a real failure there would."""
        self._inbox.put(("fault", exc))

    def stop(self) -> None:
        self._inbox.put(_STOP)

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread
    def _run(self) -> None:
        try:
            import mlx.core as mx

            gen = self._load_and_make_generator()
        except BaseException as exc:  # forwarded to whoever awaits the load
            self._loaded.set_exception(exc)
            self.dead = exc
            return
        try:
            if self._link is not None:
                self._link.sync_seed()
        except BaseException as exc:
            self._loaded.set_exception(exc)
            self.dead = exc
            return
        self._loaded.set_result(None)
        try:
            self._serve(gen, mx)
        except BaseException as exc:  # the thread boundary: fail every request, report
            log.exception("generation thread of %s died", self.name)
            self.dead = exc
            err = EngineFailure(f"the generation thread of model {self.name!r} failed: {exc}")
            victims = [*self._active.values(), *(g for g, _ in self._waiting)]
            self._active.clear()
            self._waiting.clear()
            self._out_fail(victims, err)
            self._drain_after_death(err)
            self._out_death(exc)
        finally:
            try:
                gen.close()
            except Exception:  # closing is best effort
                pass
            self.model = self.tokenizer = self.prompt_cache = None

    def _drain_after_death(self, err: BaseException) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                return
            if item[0] == "submit":
                self._out_fail([item[1]], err)
            elif item[0] == "call":
                item[2].set_exception(err)

    def _serve(self, gen: Any, mx: Any) -> None:
        inbox = self._inbox
        active = self._active
        waiting = self._waiting
        uid_of: dict[int, int] = {}  # id(Generation) -> uid
        link = self._link
        want_lp: set[int] = set()
        window = self._join_window_s
        longest = max(window, ARRIVING_WAIT_S)  # the wait for requests still in the front
        # When each sequence ended whose client has not come back yet (closed-loop clients send
        # their next request as soon as one ends): new arrivals wait, within the window, for as
        # many as ended in the last RETURN_S; an end older than that no longer holds anyone.
        ended: collections.deque[float] = collections.deque()
        coming = 0  # requests on their way from the HTTP front, as last read
        while True:
            # Take every command waiting; block only when there is nothing to step, and then
            # no longer than the oldest waiting request's join window (or the oldest end's
            # RETURN_S, whichever comes first); while requests are still on their way from the
            # front, look again every POLL_S (the count falls without a message here).
            timeout: Optional[float] = None
            if not active:
                timeout = 0.5 if not waiting else waiting[0][1] + window - time.perf_counter()
                if waiting and ended:  # or until the oldest end stops holding them
                    timeout = min(timeout, ended[0] + RETURN_S - time.perf_counter())
                if waiting and coming:
                    timeout = min(POLL_S, waiting[0][1] + longest - time.perf_counter())
                elif waiting and not ended:  # settling: until SETTLE_S after the latest arrival
                    timeout = min(waiting[-1][1] + SETTLE_S, waiting[0][1] + longest) - time.perf_counter()
            commands: list[Any] = []
            while True:
                try:
                    if timeout is not None and timeout > 0:
                        item = inbox.get(timeout=timeout)
                    else:
                        item = inbox.get_nowait()
                except queue.Empty:
                    if timeout is not None and not waiting:
                        ended.clear()  # idle for a while: nobody is coming back
                        continue
                    break
                timeout = None
                if item is _STOP:
                    commands.append(item)
                    break
                kind = item[0]
                if kind == "fault":  # testing only: see inject_fault
                    raise item[1]
                if kind == "call":
                    fn, fut = item[1], item[2]
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn(self.model, self.tokenizer))
                        except BaseException as exc:  # forwarded to the caller
                            fut.set_exception(exc)
                    continue
                if kind == "submit":
                    if not item[1].done:
                        waiting.append((item[1], time.perf_counter()))
                    continue
                if id(item[1]) in uid_of:  # cancel of a request in the batch
                    commands.append(item)
                elif waiting:  # cancel of one not in the batch yet (or already ended)
                    waiting[:] = [w for w in waiting if w[0] is not item[1]]
            # Join: requests that arrive together are prefilled together. Wait (at most the
            # window) while fewer have arrived than just ended, and (at most `longest`) while
            # more are on their way from the HTTP front and would fit, unless a prefill batch is
            # full.
            now = time.perf_counter()
            while ended and now - ended[0] > RETURN_S:
                ended.popleft()
            coming = settling = 0
            if waiting and window > 0 and len(active) + len(waiting) < self._completion_batch_size:
                coming = self._arriving()
                settling = not active and not ended and now - waiting[-1][1] < SETTLE_S
            if waiting and (
                window <= 0
                or len(waiting) >= self._prefill_batch_size
                or now - waiting[0][1] >= (longest if coming or settling else window)
                or (not coming and not settling and len(waiting) >= max(1, len(ended)))
            ):
                commands.extend(("submit", g) for g, _ in waiting if not g.done)
                self.stats["joins"] += 1
                self.stats["joined"] += len(waiting)
                for _ in range(min(len(waiting), len(ended))):
                    ended.popleft()
                waiting.clear()
            if link is not None and (commands or active):
                # The other ranks apply the same decisions to their batches, in this order.
                link.share([_wire(c, uid_of) for c in commands] or None)
            for item in commands:
                if item is _STOP:
                    victims = [*active.values(), *(g for g, _ in waiting)]
                    active.clear()
                    waiting.clear()
                    self._out_fail(victims, EngineFailure(f"model {self.name!r} was unloaded"))
                    return
                g: Generation = item[1]
                if item[0] == "submit":
                    uid, g.cached_tokens = self._insert(gen, g.prompt_tokens, g.params)
                    active[uid] = g
                    uid_of[id(g)] = uid
                    if g.params.logprobs:
                        want_lp.add(uid)
                else:  # cancel
                    gone = uid_of.pop(id(g))
                    active.pop(gone, None)
                    want_lp.discard(gone)
                    gen.remove([gone])
                    ended.append(time.perf_counter())
            if not active:
                continue
            _, responses = gen.next()
            if not responses:
                continue
            now = time.perf_counter()
            events = []
            for r in responses:
                g2 = active.get(r.uid)
                if g2 is None:
                    continue
                finish = r.finish_reason
                token: Optional[int] = r.token
                if finish == "stop":
                    token = None  # the end-of-sequence token is not part of the text
                lp = top = None
                if r.uid in want_lp and token is not None:
                    lp, top = _logprobs(mx, r.logprobs, token, g2.params.top_logprobs)
                events.append((g2, token, finish, lp, top))
                if finish is not None:
                    del active[r.uid]
                    uid_of.pop(id(g2), 0)
                    want_lp.discard(r.uid)
                    ended.append(now)
                    self._keep_cache(gen, r)
            self._out_step(events, now)

    # -- where the thread's results go: the event loop here; the pipe in an engine process
    def _out_step(self, events: list[tuple[Any, ...]], now: float) -> None:
        self._loop.call_soon_threadsafe(_deliver, events, now)

    def _out_fail(self, victims: list[Generation], err: BaseException) -> None:
        self._loop.call_soon_threadsafe(_fail_all, victims, err)

    def _out_death(self, exc: BaseException) -> None:
        if self._on_death is not None:
            self._loop.call_soon_threadsafe(self._on_death, self.name, exc)

    def _load_and_make_generator(self) -> Any:
        """Load the model on this thread and wrap it in a BatchGenerator on this thread's stream."""
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.models.cache import LRUPromptCache

        from . import batching as fast
        from . import fusion, prompt_cache

        self.model, self.tokenizer = self._loader()
        fused = self._fuse()
        if cuda.install(self._unfused_attention_elements, self._decode_kernel):
            log.info(
                "model %s: prefill attention %s; masked decode attention %s",
                self.name,
                f"up to {self._unfused_attention_elements} scores runs unfused (not through cuDNN)"
                if self._unfused_attention_elements > 0 else "through cuDNN",
                "in the appliance's kernel" if cuda.decode_kernel_in_force() else "as MLX runs it",
            )
        args = getattr(self.model, "args", None)
        self.vocab_size = int(getattr(args, "vocab_size", 0) or len(self.tokenizer._tokenizer))
        # mlx-lm's, with a lookup that does not walk every cached token (prompt_cache.py)
        cache_cls = prompt_cache.PromptCache if prompt_cache.usable() else LRUPromptCache
        self.prompt_cache = cache_cls(max_size=64, max_bytes=self._prompt_cache_bytes)
        if self._prompt_cache_min_tokens is None:
            self._prompt_cache_min_tokens = 32 if on_cuda() else 0
        cls = BatchGenerator
        if self._fast_joins:
            if fast.usable():
                cls = fast.BatchGenerator
            else:
                log.warning("model %s: this mlx-lm's batching is not the one fast_joins extends; "
                            "using mlx-lm's own", self.name)
        gen = cls(
            self.model,
            stop_tokens=[[t] for t in sorted(self.tokenizer.eos_token_ids)],
            completion_batch_size=self._completion_batch_size,
            prefill_batch_size=self._prefill_batch_size,
            prefill_step_size=self._prefill_step_size,
            max_kv_size=self._max_kv_size,
            stream=mx.default_stream(mx.default_device()),
        )
        self._warm_up(gen)
        if fused and (back := fusion.unfuse_wasteful(self.model)):
            log.info("model %s: %d of %d fused groups put back as separate layers (in the warm-up "
                     "the model did not use each of their projections once on one input)",
                     self.name, back, fused)
        return gen

    def _fuse(self) -> int:
        """Fuse the loaded model's q/k/v and gate/up projections (fusion.py), unless switched off
        or the model is split across ranks (its projections are sharded layers then)."""
        if not self._fuse_projections:
            return 0
        if self._link is not None:
            log.info("model %s: projections not fused (the model is split across ranks)", self.name)
            return 0
        from . import fusion

        t0 = time.perf_counter()
        n = fusion.fuse_projections(self.model)
        if n:
            log.info("model %s: fused q/k/v and gate/up projections in %d groups in %.2f s",
                     self.name, n, time.perf_counter() - t0)
        else:
            log.info("model %s: no q/k/v or gate/up projections that fusion takes", self.name)
        return n

    def _warm_up(self, gen: Any) -> None:
        """Short generations before the model counts as loaded, so that MLX compiles its kernels
        now and not in the first requests: on CUDA that is NVRTC, 7-12 s on a fresh machine (an
        H200; MLX keeps what it compiled in its PTX cache folder after that). The paths requests
        take: prompts of two lengths prefilled together (right padding), decode, a leave while
        another runs, and a prompt joining with a cached prefix. Every rank of a group does the
        same, in step."""
        t0 = time.perf_counter()
        prompt = [int(t) for t in self.tokenizer.encode("Hello, world")][:8] or [0]
        prompt = (prompt * 4)[: max(4, len(prompt))]
        cache, tokens = _run_to_end(gen, [prompt, prompt[:-1]], [2, 3])
        if cache is not None and all(hasattr(c, "merge") for c in cache):  # else no prefix reuse
            _run_to_end(gen, [prompt[:2]], [2], caches=[cache], all_tokens=[tokens])
        log.info("model %s: warmed up in %.2f s", self.name, time.perf_counter() - t0)

    def follow(self) -> None:
        """A non-zero rank: apply rank 0's decisions and step in lock-step until told to stop."""
        assert self._link is not None
        gen = self._load_and_make_generator()
        self._link.sync_seed()
        active: set[int] = set()
        while True:
            commands = self._link.share(None) or []
            for c in commands:
                if c[0] == "x":
                    return
                if c[0] == "s":
                    uid, _ = self._insert(gen, c[1], c[2])
                    active.add(uid)
                else:
                    active.discard(c[1])
                    gen.remove([c[1]])
            if not active:
                continue
            _, responses = gen.next()
            for r in responses:
                if r.finish_reason is not None:
                    active.discard(r.uid)
                    self._keep_cache(gen, r)

    def _keep_cache(self, gen: Any, r: Any) -> None:
        if r.prompt_cache is not None and self._prompt_cache_bytes > 0:
            import mlx.core as mx
            from mlx.utils import tree_flatten

            # A finished row's cache is a lazy copy out of the batch's buffers, and until it is
            # evaluated it keeps all of them alive (the whole batch's keys and values, every
            # layer): kept entries held 9x and more the bytes the cache counted (tests/test_prompt_cache.py).
            # Copied now, on the stream, without waiting for it.
            leaves: Any = tree_flatten([c.state for c in r.prompt_cache])
            mx.async_eval([a for _, a in leaves if isinstance(a, mx.array)])
            self.prompt_cache.insert_cache(
                self.path, list(r.all_tokens), r.prompt_cache, cache_type="assistant"
            )
            self.prompt_cache.trim_to(n_bytes=self._prompt_cache_bytes - gen.prompt_cache_nbytes)

    def _insert(self, gen: Any, prompt: list[int], params: SamplingParams) -> tuple[int, int]:
        cache = None
        rest = prompt
        if self._prompt_cache_bytes > 0:
            cache, rest = self.prompt_cache.fetch_nearest_cache(self.path, prompt)
        cached = len(prompt) - len(rest)
        if cache is not None and cached == len(prompt) and cached > 1:
            # An exact hit: the last prompt token must still go through the model to give the
            # first logits, so keep all but it.
            from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                cached, rest = cached - 1, prompt[-1:]
        if cache is not None and max(1, self._prompt_cache_min_tokens or 0) <= cached < len(prompt):
            self.stats["cache_hits"] += 1
            self.stats["cached_tokens"] += cached
        else:
            self.stats["cache_misses"] += 1
            cache, rest, cached = None, prompt, 0
        (uid,) = gen.insert(
            [rest],
            max_tokens=[params.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[prompt[:cached]],
            samplers=[_make_sampler(params)],
            logits_processors=[_make_processors(params)],
        )
        return int(uid), cached


def _run_to_end(gen: Any, prompts: list[list[int]], max_tokens: list[int], **kw: Any) -> tuple[Any, Any]:
    """Generate until these prompts end (at most 64 steps); the first one to end's prompt cache
    and tokens (the warm-up's cached prefix)."""
    uids = set(gen.insert(prompts, max_tokens=max_tokens, **kw))
    first: tuple[Any, Any] = (None, None)
    for _ in range(64):
        if not uids:
            break
        _, responses = gen.next()
        for r in responses:
            if r.finish_reason is not None:
                uids.discard(r.uid)
                if first[0] is None and r.prompt_cache is not None:
                    first = (r.prompt_cache, list(r.all_tokens))
    gen.remove(list(uids))
    return first


def _wire(item: Any, uid_of: dict[int, int]) -> tuple[Any, ...]:
    """A command as the other ranks receive it: no Python objects of this process."""
    if item is _STOP:
        return ("x",)
    if item[0] == "submit":
        return ("s", item[1].prompt_tokens, item[1].params)
    return ("c", uid_of[id(item[1])])


def _logprobs(
    mx: Any, logprobs: Any, token: int, k: int
) -> tuple[float, Optional[list[TopLogprob]]]:
    lp = float(logprobs[token].item())
    if k <= 0:
        return lp, None
    idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
    vals = logprobs[idx]
    pairs = sorted(zip(idx.tolist(), vals.tolist(), strict=True), key=lambda t: -t[1])
    return lp, [TopLogprob(int(t), float(v)) for t, v in pairs]


def _deliver(events: list[tuple[Any, ...]], now: float) -> None:
    for g, token, finish, lp, top in events:
        g.push(token, finish, lp, top, now)


def _fail_all(victims: list[Generation], err: BaseException) -> None:
    for g in victims:
        g.fail(err)
