"""The generation thread of one loaded model, around mlx_lm's BatchGenerator.

Everything MLX happens on this thread (streams belong to the thread that made them): load,
prefill, decode, embeddings and memory estimates. Requests join the running batch between
steps (when, `join.JoinPolicy` decides) and leave it when finished or cancelled. The thread
reads `commands` from its inbox; each decode step is handed to the event loop in one
`call_soon_threadsafe`, not one per token per request.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, Optional

import numpy as np

from ..errors import EngineFailure, InvalidRequest
from .commands import Call, Cancel, Command, Fault, Stop, Submit
from .governor import PREFILLED_MIN_TOKENS
from .join import JoinPolicy
from .memory import on_cuda
from .mlx_ext import cuda
from .sampling import make_processors, make_sampler
from .types import Generation, SamplingParams, TopLogprob

log = logging.getLogger("appliance.engine")

# An engine step that took longer while sequences were decoding is logged: each of them waited
# that long for a token (a stall an operator can then see, with what the step prefilled).
SLOW_STEP_S = 0.25
# The warm-up's lone prompt on CUDA. A lone row decodes with no mask, and MLX then takes cuDNN's
# attention over 256 keys or more (a graph built on first use: a first decode step of 468-510 ms
# in a machine's first process, 66 ms in later ones, on an H100 and an H200), or with cuDNN off
# its own two-pass kernel over more than 1,024; the warm-up's short prompts reached neither.
LONG_WARM_UP = 1100


def batching(spec: Any) -> dict[str, Any]:
    """A catalog entry's batching settings (and projection fusion) as ModelWorker takes them."""
    return {
        "prefill_step_size": spec.prefill_step_size,
        "prefill_budget": spec.prefill_budget_tokens,
        "completion_batch_size": spec.completion_batch_size,
        "prefill_batch_size": spec.prefill_batch_size or spec.completion_batch_size,
        "max_kv_size": spec.max_kv_size,
        "join_window_s": spec.join_window_s,
        "fast_joins": spec.fast_joins,
        "fuse_projections": spec.fuse_projections,
        "kv_bits": spec.kv_bits,
    }


def empty_stats() -> dict[str, int]:
    """A worker's counters before any request: prompt cache use and joins (see metrics.py)."""
    return {
        "cache_hits": 0,
        "cache_misses": 0,
        "cached_tokens": 0,
        "joins": 0,
        "joined": 0,
        "disk_hits": 0,  # requests whose cached prefix came from the disk tier
        "disk_tokens": 0,  # prompt tokens served from it
        "disk_bytes": 0,  # bytes of the disk tier's files (a gauge)
    }


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

    def _settle_load(self, exc: Optional[BaseException]) -> None:
        """Tell `start` how the load ended, unless nobody waits any more: shutdown cancels a start
        still waiting (and with it this future); the thread then goes on to see its Stop."""
        try:
            if exc is None:
                self._loaded.set_result(None)
            else:
                self._loaded.set_exception(exc)
        except InvalidStateError:
            pass


def default_prefill_step(mx: Any) -> int:
    """Prompt tokens a prefill step takes when the profile says none: on a GPU 2048, as mlx-lm
    does (on an H100, 8,000 tokens after a cached prefix took 0.44 s in 2,048-token chunks and
    0.56-0.65 s in 512-token ones); on the CPU 512, which holds a decoding stream less long."""
    return 2048 if mx.default_device() == mx.gpu else 512


class ModelWorker(WorkerThread):
    """Owns one model on its own thread; the registry talks to it through `submit` and `call`."""

    def __init__(
        self,
        name: str,
        path: str,
        *,
        loader: Callable[[], tuple[Any, Any]],
        loop: asyncio.AbstractEventLoop,
        prefill_step_size: Optional[int],
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
        prefill_budget: Optional[int] = None,
        on_death: Optional[Callable[[str, BaseException], None]] = None,
        link: Any = None,
        arriving: Callable[[], int] = lambda: 0,
        prompt_cache_dir: Optional[str] = None,
        prompt_cache_disk_bytes: int = 0,
        prompt_cache_preload_s: float = 0.0,
        kv_bits: Optional[int] = None,
    ) -> None:
        self.name = name
        self.path = path
        self._loader = loader
        self._loop = loop
        self._prefill_step_size = prefill_step_size
        self._prefill_budget = prefill_budget  # see batching.PrefillBudget (fast joins only)
        self._completion_batch_size = completion_batch_size
        self._prefill_batch_size = prefill_batch_size
        self._max_kv_size = max_kv_size
        self._prompt_cache_bytes = prompt_cache_bytes
        self._prompt_cache_min_tokens = prompt_cache_min_tokens  # None: by backend, at load
        self._prompt_cache_dir = prompt_cache_dir  # the disk tier (disk_cache.py), None: off
        self._prompt_cache_disk_bytes = prompt_cache_disk_bytes
        self._prompt_cache_preload_s = prompt_cache_preload_s  # the disk tier read back at load
        self._preloaded: list[Any] = []  # their token arrays, until a prompt first uses each
        self._disk: Any = None  # a disk_cache.DiskTier once loaded
        self._kv_bits = kv_bits  # cached prefixes kept quantized (prompt_cache.py)
        self._join_window_s = join_window_s
        self._fast_joins = fast_joins  # see batching.py
        self._fuse_projections = fuse_projections  # see fusion.py
        self._unfused_attention_elements = unfused_attention_elements  # CUDA only, see cuda.py
        self._decode_kernel = decode_kernel  # CUDA only, see cuda.py
        self._on_death = on_death
        self._link = link  # distributed.Link on rank 0 of a group, else None
        self._arriving = arriving  # requests the HTTP front holds on their way here (arrivals.py)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # Submitted and not finished, by request id (added on the loop, removed on this thread).
        self._gens: dict[int, Generation] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
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
        return len(self._gens)

    def submit(self, gen: Generation, rid: Optional[int] = None) -> None:
        """Queue a generation to join the batch at the next step (`rid`: the caller's id)."""
        if not self.alive:
            gen.fail(EngineFailure(f"model {self.name!r} is not running"))
            return
        gen.rid = rid = next(self._ids) if rid is None else rid
        self._gens[rid] = gen
        gen._cancel = lambda: self._inbox.put(Cancel(rid))
        self._inbox.put(Submit(rid, gen.prompt_tokens, gen.params))

    def call(self, fn: Callable[[Any, Any], Any]) -> Future[Any]:
        """Run fn(model, tokenizer) on the generation thread between steps (embeddings, ...)."""
        fut: Future[Any] = Future()
        cid = next(self._ids)
        self._calls[cid] = fut
        self._inbox.put(Call(cid, fn))
        return fut

    def inject_fault(self, exc: BaseException) -> None:
        """Testing only (reached through APPLIANCE_FAULT_INJECTION=1, never by default): make the
        generation thread raise between steps, as a real failure there would."""
        self._inbox.put(Fault(str(exc)))

    def stop(self) -> None:
        self._inbox.put(Stop())

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread
    def _run(self) -> None:
        try:
            import mlx.core as mx

            gen = self._load_and_make_generator()
        except BaseException as exc:  # forwarded to whoever awaits the load
            self._settle_load(exc)
            self.dead = exc
            return
        try:
            if self._link is not None:
                self._link.sync_seed()
        except BaseException as exc:
            self._settle_load(exc)
            self.dead = exc
            return
        self._settle_load(None)
        try:
            self._serve(gen, mx)
            self._flush_disk()
        except BaseException as exc:  # the thread boundary: fail every request, report
            log.exception("generation thread of %s died", self.name)
            self.dead = exc
            err = EngineFailure(f"the generation thread of model {self.name!r} failed: {exc}")
            victims = list(self._gens.values())
            self._gens.clear()
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
        """Answer the calls still queued after the thread died (their requests failed above)."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Stop):
                return
            if isinstance(item, Call):
                fut = self._calls.pop(item.cid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(err)

    def _run_call(self, item: Call) -> None:
        fut = self._calls.pop(item.cid, None)
        if fut is not None and fut.set_running_or_notify_cancel():
            try:
                fut.set_result(item.fn(self.model, self.tokenizer))
            except BaseException as exc:  # forwarded to the caller
                fut.set_exception(exc)

    def _serve(self, gen: Any, mx: Any) -> None:
        inbox, gens = self._inbox, self._gens
        active: dict[int, int] = {}  # uid in the batch -> rid
        uid_of: dict[int, int] = {}  # rid -> uid
        waiting: list[tuple[Submit, float]] = []  # not in the batch yet, with arrival times
        link = self._link
        want_lp: set[int] = set()
        grammars: dict[int, Any] = {}  # uid -> its grammar processor (constrained rows)
        policy = JoinPolicy(
            self._join_window_s, self._prefill_batch_size, self._completion_batch_size
        )
        while True:
            # Take every command waiting; block only when there is nothing to step, and then no
            # longer than the join policy allows.
            timeout = policy.timeout(time.perf_counter(), len(active), [t for _, t in waiting])
            commands: list[Command] = []
            while True:
                # Requests on their way, counted before each look at the inbox: the front hands
                # a request over before it stops counting it (Engine.start), so one not counted
                # here is in the inbox by the look, or came to the front after it. Counted after
                # the look, a request handed over in between was in neither, and the waiting
                # ones joined without it (on two CPU cores, with the front busy templating the
                # next arrivals, that window was a few milliseconds wide).
                coming = self._arriving()
                try:
                    if timeout is not None and timeout > 0:
                        item = inbox.get(timeout=timeout)
                    else:
                        item = inbox.get_nowait()
                except queue.Empty:
                    if timeout is not None and not waiting:
                        policy.idle()  # idle for a while: nobody is coming back
                        self._idle()
                        continue
                    break
                timeout = None
                if isinstance(item, Stop):
                    commands.append(item)
                    break
                if isinstance(item, Fault):  # testing only: see inject_fault
                    raise RuntimeError(item.message)
                if isinstance(item, Call):
                    self._run_call(item)
                elif isinstance(item, Submit):
                    g = gens.get(item.rid)
                    if g is not None and not g.done:
                        waiting.append((item, time.perf_counter()))
                elif item.rid in uid_of:  # cancel of a request in the batch
                    commands.append(item)
                else:  # cancel of one not in the batch yet (or already ended)
                    waiting[:] = [w for w in waiting if w[0].rid != item.rid]
                    gens.pop(item.rid, None)
            now = time.perf_counter()
            counted = functools.partial(int, coming)  # as read before the last look
            if policy.ready(now, len(active), [t for _, t in waiting], counted):
                commands.extend(w for w, _ in waiting if w.rid in gens)
                self.stats["joins"] += 1
                self.stats["joined"] += len(waiting)
                policy.joined(len(waiting))
                waiting.clear()
            if link is not None and (commands or active):
                # The other ranks apply the same decisions to their batches, in this order.
                link.share(commands or None)
            for item in commands:
                if isinstance(item, Stop):
                    victims = list(gens.values())
                    gens.clear()
                    self._out_fail(victims, EngineFailure(f"model {self.name!r} was unloaded"))
                    return
                if isinstance(item, Submit):
                    try:
                        uid, gens[item.rid].cached_tokens, grammar = self._insert(
                            gen, item.prompt, item.params
                        )
                    except InvalidRequest as exc:  # its grammar can't run on this model
                        self._out_fail([gens.pop(item.rid)], exc)
                        continue
                    if grammar is not None:
                        grammars[uid] = grammar
                    active[uid] = item.rid
                    uid_of[item.rid] = uid
                    if item.params.logprobs:
                        want_lp.add(uid)
                elif isinstance(item, Cancel):
                    gone = uid_of.pop(item.rid)
                    active.pop(gone, None)
                    grammars.pop(gone, None)
                    want_lp.discard(gone)
                    gens.pop(item.rid, None)
                    gen.remove([gone])
                    policy.ended_at(time.perf_counter())
            if not active:
                continue
            t_step = time.perf_counter()
            _, responses = gen.next()
            self._keep_prefilled(gen)
            if not responses:
                continue
            now = time.perf_counter()
            if now - t_step > SLOW_STEP_S:
                log.info(
                    "model %s: a step took %.0f ms (streams decoding: %d; prompt tokens "
                    "prefilled: %d)",
                    self.name,
                    (now - t_step) * 1000,
                    len(responses),
                    getattr(gen, "_prefilled", 0),
                )
            events = []
            failed: list[tuple[Generation, BaseException]] = []
            for r in responses:
                rid = active.get(r.uid)
                g2 = gens.get(rid) if rid is not None else None
                if rid is None or g2 is None:
                    continue
                finish = r.finish_reason
                token: Optional[int] = r.token
                if finish == "stop":
                    token = None  # the end-of-sequence token is not part of the text
                lp = top = None
                if r.uid in want_lp and token is not None:
                    lp, top = _logprobs(mx, r.logprobs, token, g2.params.top_logprobs)
                grammar = grammars.pop(r.uid, None) if finish is not None else None
                error = grammar.exception() if grammar is not None else None
                if error is not None:  # the grammar failed: an error, not a finished answer
                    failed.append((g2, error))
                else:
                    events.append((g2, token, finish, lp, top))
                if finish is not None:
                    del active[r.uid]
                    uid_of.pop(rid, None)
                    gens.pop(rid, None)
                    want_lp.discard(r.uid)
                    policy.ended_at(now)
                    self._keep_cache(gen, r)
            self._out_step(events, now)
            for g3, error in failed:
                self._out_fail([g3], error)
            # Idle, the thread blocks here with these still bound: a finished row's cache would
            # outlive its eviction from the prompt cache (the memory governor counts on it).
            responses = r = None

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

        from .mlx_ext import batching as fast
        from .mlx_ext import fusion, prompt_cache

        self.model, self.tokenizer = self._loader()
        identity = self._model_identity()
        fused = self._fuse()
        if cuda.install(self._unfused_attention_elements, self._decode_kernel):
            log.info(
                "model %s: prefill attention %s; masked decode attention %s",
                self.name,
                f"up to {self._unfused_attention_elements} scores runs unfused (not through cuDNN)"
                if self._unfused_attention_elements > 0
                else "through cuDNN",
                "in the appliance's kernel" if cuda.decode_kernel_in_force() else "as MLX runs it",
            )
        args = getattr(self.model, "args", None)
        self.vocab_size = int(getattr(args, "vocab_size", 0) or len(self.tokenizer._tokenizer))
        # mlx-lm's, with a lookup that does not walk every cached token (prompt_cache.py)
        if prompt_cache.usable():
            self.prompt_cache = prompt_cache.PromptCache(
                max_size=64, max_bytes=self._prompt_cache_bytes, kv_bits=self._kv_bits
            )
        else:
            self.prompt_cache = LRUPromptCache(max_size=64, max_bytes=self._prompt_cache_bytes)
            if self._kv_bits is not None:
                log.warning("model %s: kv_bits needs the appliance's prompt cache", self.name)
                self._kv_bits = None
        self._open_disk(identity)
        if self._prompt_cache_min_tokens is None:
            self._prompt_cache_min_tokens = 32 if on_cuda() else 0
        cls: Any = BatchGenerator
        extra: dict[str, Any] = {}
        if self._fast_joins:
            if fast.usable():
                cls = fast.BatchGenerator
                # learnt from step times, the budget would differ between the ranks of a group,
                # whose steps must match: there it is off unless fixed
                learnt = self._prefill_budget == 0
                split = self._link is not None
                extra["prefill_budget"] = None if learnt and split else self._prefill_budget
            else:
                log.warning(
                    "model %s: this mlx-lm's batching is not the one fast_joins extends; "
                    "using mlx-lm's own",
                    self.name,
                )
        gen = cls(
            self.model,
            stop_tokens=[[t] for t in sorted(self.tokenizer.eos_token_ids)],
            completion_batch_size=self._completion_batch_size,
            prefill_batch_size=self._prefill_batch_size,
            prefill_step_size=self._prefill_step_size or default_prefill_step(mx),
            max_kv_size=self._max_kv_size,
            stream=mx.default_stream(mx.default_device()),
            **extra,
        )
        self._warm_up(gen)
        self._preload_disk()
        if self._prompt_cache_bytes > 0 and hasattr(gen, "keep_prefilled"):
            gen.keep_prefilled = True
        self._grammar_bridge()
        if fused and (back := fusion.unfuse_wasteful(self.model)):
            log.info(
                "model %s: %d of %d fused groups put back as separate layers (in the warm-up "
                "the model did not use each of their projections once on one input)",
                self.name,
                back,
                fused,
            )
        return gen

    def _grammar_bridge(self) -> None:
        """Build llguidance's view of the tokenizer now (0.3-0.5 s at a 49k vocabulary), not in
        the first constrained request."""
        from .constraints import TokenizerBridge

        try:
            b = TokenizerBridge.for_tokenizer(self.tokenizer, vocab_size=self.vocab_size)
            log.info("model %s: grammar tokenizer ready in %.2f s", self.name, b.build_s)
        except Exception as exc:  # constrained requests to this model will say why
            log.warning("model %s: constrained output is not available: %s", self.name, exc)

    def _fuse(self) -> int:
        """Fuse the loaded model's q/k/v and gate/up projections (fusion.py), unless switched off
        or the model is split across ranks (its projections are sharded layers then)."""
        if not self._fuse_projections:
            return 0
        if self._link is not None:
            log.info("model %s: projections not fused (the model is split across ranks)", self.name)
            return 0
        from .mlx_ext import fusion

        if not fusion.usable():
            log.warning(
                "model %s: this MLX's linear layers are not the ones fusion copies; "
                "projections left unfused",
                self.name,
            )
            return 0
        t0 = time.perf_counter()
        n = fusion.fuse_projections(self.model)
        if n:
            log.info(
                "model %s: fused q/k/v and gate/up projections in %d groups in %.2f s",
                self.name,
                n,
                time.perf_counter() - t0,
            )
        else:
            log.info("model %s: no q/k/v or gate/up projections that fusion takes", self.name)
        return n

    def _warm_up(self, gen: Any) -> None:
        """Short generations before the model counts as loaded, so that MLX compiles its kernels
        now and not in the first requests: on CUDA that is NVRTC, 7-12 s on a fresh machine (an
        H200; MLX keeps what it compiled in its PTX cache folder after that). The paths requests
        take: prompts of two lengths prefilled together (right padding), decode, a leave while
        another runs, and a prompt joining with a cached prefix; on CUDA then every layout of the
        masked decode kernel (cuda.build_decode_layouts) and a lone prompt of LONG_WARM_UP
        tokens. Every rank of a group does the same, in step."""
        t0 = time.perf_counter()
        prompt = [int(t) for t in self.tokenizer.encode("Hello, world")][:8] or [0]
        prompt = (prompt * 4)[: max(4, len(prompt))]
        cache, tokens = _run_to_end(gen, [prompt, prompt[:-1]], [2, 3])
        if cache is not None and all(hasattr(c, "merge") for c in cache):  # else no prefix reuse
            _run_to_end(gen, [prompt[:2]], [2], caches=[cache], all_tokens=[tokens])
        if cuda.decode_kernel_in_force():
            cuda.build_decode_layouts()  # the layouts long contexts take, not reached here
        if on_cuda():  # a lone stream over LONG_WARM_UP keys
            _run_to_end(gen, [(prompt * LONG_WARM_UP)[:LONG_WARM_UP]], [3])
        if hasattr(gen, "budget"):
            gen.budget.forget()  # its steps' times are the kernels' compiling
        log.info("model %s: warmed up in %.2f s", self.name, time.perf_counter() - t0)

    def follow(self) -> None:
        """A non-zero rank: apply rank 0's decisions and step in lock-step until told to stop."""
        assert self._link is not None
        gen = self._load_and_make_generator()
        self._link.sync_seed()
        uid_of: dict[int, int] = {}  # rank 0's request id -> uid in this rank's batch
        while True:
            commands: list[Command] = self._link.share(None) or []
            for c in commands:
                if isinstance(c, Stop):
                    return
                if isinstance(c, Submit):
                    try:
                        uid_of[c.rid], _, _ = self._insert(gen, c.prompt, c.params)
                    except InvalidRequest:  # rank 0 skipped it as well
                        continue
                elif isinstance(c, Cancel) and c.rid in uid_of:
                    gen.remove([uid_of.pop(c.rid)])
            if not uid_of:
                continue
            _, responses = gen.next()
            self._keep_prefilled(gen)
            for r in responses:
                if r.finish_reason is not None:
                    uid_of = {k: u for k, u in uid_of.items() if u != r.uid}
                    self._keep_cache(gen, r)

    def _keep_cache(self, gen: Any, r: Any) -> None:
        """A finished sequence's cache (prompt and answer): the next turn of its conversation
        resends both."""
        if r.prompt_cache is not None and self._prompt_cache_bytes > 0:
            self._cache_insert(gen, list(r.all_tokens), r.prompt_cache, "assistant")

    def _keep_prefilled(self, gen: Any) -> None:
        """The caches of prompts whose prefill just ended (batching.BatchGenerator's
        keep_prefilled), so that another session can start from their shared prefix before
        this one finishes. A later insert of the whole sequence replaces them (a prefix)."""
        done = getattr(gen, "prefilled", None)
        if not done:
            return
        for tokens, cache in done:
            room = self._prompt_cache_bytes
            # a copy the cache's budget can't hold would be trimmed at once: not made (the
            # memory governor counts the copy only where it fits, too)
            if len(tokens) >= PREFILLED_MIN_TOKENS and _nbytes(cache) <= room:
                self._cache_insert(gen, tokens, cache, "user")
        done.clear()

    def _cache_insert(self, gen: Any, tokens: list[int], cache: list[Any], kind: str) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        # A row's cache is a lazy copy out of the batch's buffers, and until it is evaluated
        # it keeps all of them alive (the whole batch's keys and values, every layer): kept
        # entries held 9x and more the bytes the cache counted (tests/test_prompt_cache.py).
        # Copied now, on the stream, without waiting for it.
        leaves: Any = tree_flatten([c.state for c in cache])
        mx.async_eval([a for _, a in leaves if isinstance(a, mx.array)])
        self.prompt_cache.insert_cache(self.path, tokens, cache, cache_type=kind)
        # the cache's own budget: the running batch is the memory governor's to count (taking
        # it out of this budget emptied the cache whenever long conversations ran)
        self.prompt_cache.trim_to(n_bytes=self._prompt_cache_bytes)

    def _insert(self, gen: Any, prompt: list[int], params: SamplingParams) -> tuple[int, int, Any]:
        """Put a prompt in the batch (with its cached prefix); (uid, cached tokens, grammar
        processor or None). Raises InvalidRequest when its grammar can't run on this model."""
        processors = make_processors(params)
        grammar = None
        if params.constraint is not None:
            from .constraints import make_processor

            grammar = make_processor(params.constraint, self.tokenizer, vocab_size=self.vocab_size)
            processors.append(grammar)  # last: nothing after it lifts the mask
        cache = None
        rest = prompt
        from_disk = False
        if self._prompt_cache_bytes > 0:
            cache, rest = self.prompt_cache.fetch_nearest_cache(self.path, prompt)
            if self._disk is not None:
                cache, rest, from_disk = self._from_disk(prompt, cache, rest)
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
            if from_disk or self._first_use_of_preloaded(prompt, cached):
                self.stats["disk_hits"] += 1
                self.stats["disk_tokens"] += cached
        else:
            self.stats["cache_misses"] += 1
            cache, rest, cached = None, prompt, 0
        (uid,) = gen.insert(
            [rest],
            max_tokens=[params.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[prompt[:cached]],
            samplers=[make_sampler(params)],
            logits_processors=[processors],
        )
        return int(uid), cached, grammar

    # -- the prompt cache's disk tier (disk_cache.py): read in _insert, written when idle
    def _model_identity(self) -> Optional[str]:
        """The loaded model's identity for the disk tier (before fusion renames parameters)."""
        if self._prompt_cache_dir is None or self._link is not None or self._max_kv_size:
            return None
        from .disk_cache import model_identity

        return model_identity(self.model)

    def _open_disk(self, identity: Optional[str]) -> None:
        """Open this model's folder of the disk tier: off in a group of ranks (each rank would
        have to read the same files at the same step), with a rotating cache (mlx-lm's file
        format does not keep its settings) or without a memory cache."""
        if self._prompt_cache_dir is None or self._prompt_cache_bytes <= 0:
            return
        if identity is None:
            log.warning(
                "model %s: no disk tier for the prompt cache (%s)",
                self.name,
                "split across ranks" if self._link is not None else "max_kv_size is set",
            )
            return
        from .disk_cache import DiskCache, DiskTier, folder_for

        folder = folder_for(self._prompt_cache_dir, self.name)
        t0 = time.perf_counter()
        disk = DiskCache(
            folder, self._prompt_cache_disk_bytes, identity, f"kv_bits={self._kv_bits}"
        )
        self._disk = DiskTier(disk, pending_bytes=self._prompt_cache_bytes)
        if hasattr(self.prompt_cache, "on_evict"):
            self.prompt_cache.on_evict = self._disk.spill
        self.stats["disk_bytes"] = disk.nbytes
        log.info(
            "model %s: prompt cache disk tier %s: %d files, %d bytes (%d removed) in %.2f s",
            self.name,
            folder,
            len(disk),
            disk.nbytes,
            disk.removed,
            time.perf_counter() - t0,
        )

    def _preload_disk(self) -> None:
        """At load: the disk tier's most recently used files back into memory (within the
        memory's budget, for up to prompt_cache_preload_s), so that the first turns after a
        restart find their prefixes there instead of waiting for the disk."""
        if self._disk is None or self._prompt_cache_preload_s <= 0:
            return
        t0 = time.perf_counter()
        room = self._prompt_cache_bytes - int(getattr(self.prompt_cache, "nbytes", 0))
        try:
            found = self._disk.preload(room, t0 + self._prompt_cache_preload_s)
            for tokens, cache in reversed(found):  # oldest first: the newest ends most recent
                self.prompt_cache.insert_cache(self.path, tokens, cache, cache_type="assistant")
                self._preloaded.append(np.asarray(tokens, dtype=np.int64))
            self.prompt_cache.trim_to(n_bytes=self._prompt_cache_bytes)
        except Exception:  # the disk tier never takes the model down: the files wait on disk
            log.exception("model %s: reading the prompt cache back from disk failed", self.name)
            return
        self.stats["disk_bytes"] = self._disk.disk.nbytes
        log.info(
            "model %s: %d prompt cache files of %d (%d tokens) read back from disk in %.2f s",
            self.name,
            len(found),
            len(self._disk.disk),
            sum(len(t) for t, _ in found),
            time.perf_counter() - t0,
        )

    def _first_use_of_preloaded(self, prompt: list[int], cached: int) -> bool:
        """Whether a memory hit of `cached` tokens is the first use of a prefix read back from
        disk at load (then it counts as served from disk, as a read at its arrival would)."""
        if not self._preloaded:
            return False
        head = np.asarray(prompt[:cached], dtype=np.int64)
        for i, tokens in enumerate(self._preloaded):
            if len(tokens) >= cached and np.array_equal(tokens[:cached], head):
                del self._preloaded[i]
                return True
        return False

    def _from_disk(self, prompt: list[int], cache: Any, rest: list[int]) -> tuple[Any, Any, bool]:
        """The memory's match, or a longer one from disk (then kept in memory as well)."""
        t0 = time.perf_counter()
        found = self._disk.lookup(prompt, len(prompt) - len(rest) if cache is not None else 0)
        self.stats["disk_bytes"] = self._disk.disk.nbytes
        if found is None:
            return cache, rest, False
        tokens, loaded = found
        log.info(
            "model %s: a cached prefix of %d tokens read from disk in %.0f ms",
            self.name,
            len(tokens),
            (time.perf_counter() - t0) * 1000,
        )
        self.prompt_cache.insert_cache(self.path, tokens, loaded, cache_type="assistant")
        self.prompt_cache.trim_to(n_bytes=self._prompt_cache_bytes)
        better, rest2 = self.prompt_cache.fetch_nearest_cache(self.path, prompt)
        if better is None or len(rest2) >= len(rest):
            return cache, rest, False
        return better, rest2, True

    def _idle(self, budget_s: float = 0.2) -> None:
        """Idle: write what the disk tier lacks for up to `budget_s`, while nothing arrives."""
        if self._disk is None:
            return
        self._write_disk(time.perf_counter() + budget_s, lambda: not self._inbox.empty())

    def _flush_disk(self, budget_s: float = 8.0) -> None:
        """At unload or shutdown: write the memory entries to disk, most recent first, within
        `budget_s` (the registry waits 10 s for the thread)."""
        if self._disk is None:
            return
        t0 = time.perf_counter()
        done = self._write_disk(t0 + budget_s)
        log.info(
            "model %s: prompt cache written to disk in %.2f s (%s; %d files, %d bytes)",
            self.name,
            time.perf_counter() - t0,
            "complete" if done else "cut short",
            len(self._disk.disk),
            self._disk.disk.nbytes,
        )

    def _write_disk(self, deadline: float, busy: Callable[[], bool] = lambda: False) -> bool:
        try:
            cache = self.prompt_cache
            done = bool(
                self._disk.write_some(
                    lambda: cache.entries(self.path) if hasattr(cache, "entries") else [],
                    getattr(cache, "version", None),
                    deadline,
                    busy,
                )
            )
        except Exception:  # the disk tier never takes the model down
            log.exception("model %s: writing the prompt cache to disk failed", self.name)
            return False
        self.stats["disk_bytes"] = self._disk.disk.nbytes
        return done


def _nbytes(cache: list[Any]) -> int:
    return int(sum(c.nbytes for c in cache))


def _run_to_end(
    gen: Any, prompts: list[list[int]], max_tokens: list[int], **kw: Any
) -> tuple[Any, Any]:
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
