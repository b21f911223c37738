"""mlx-lm's BatchGenerator with cheaper joins and leaves.

Continuous batching changes the running batch whenever requests join or leave, and on a fast
accelerator each change used to cost more than the work it added. Measured on an H200 with the
1B Llama shape (`benchmarks/accelerator/join_anatomy.py`, 40 sequences decoding, 16 joining, each
phase synchronized apart; a decode step of the batch takes 7-8 ms):

- split: 7-9 ms. The prompts that finished prefilling are split off the prompt batch with a deep
  copy of its whole KV cache, though usually every row moves and the original is then emptied.
- new batch: 9-11 ms. The joiners get a generation batch of their own whose constructor runs a
  forward pass for their last prompt token alone, before being merged into the running batch.
- filter: 10-15 ms. When requests leave, each layer's cache evaluates its left padding on its own
  (`tolist()`: one host round trip per layer) to trim the common padding.

Here the joiners' last prompt token goes into the running batch's next step with everyone else
(the step that feeds it yields nothing for them, as their own batch's constructor yielded
nothing before), the prompt batch moves without a copy when all of it is ready, and the left
padding is read once per change instead of once per layer (every layer of a batch has the same
padding: they are built, padded, merged and filtered together). Rows are also joined in the
same call that prefilled them, so the first token comes no later than before.

While rows decode and one prompt is being prefilled, its chunk rides in the decode step's forward
pass (`mixed.forward`, for the model families it knows) instead of a forward pass of its own
after the step.

A row alone in the batch decodes through plain KVCaches over the same buffers (no attention mask,
a scalar position), as mlx-lm's single-stream generate_step does, and goes back to BatchKVCaches
without a copy when the batch changes: on an H100 1.4-1.8 ms a step less than the batched path
at batch 1 (`benchmarks/accelerator/solo_ab.py`, `step_by_batch.py`).

The results are those of mlx-lm's own path, in the same next() calls, with the same admissions
(tests/test_batching.py compares the two on the demo model and on random schedules of joins,
leaves and cancels), up to floating-point differences from the batch shape the joiners' first
step runs in. It subclasses
mlx-lm 0.32's internals; `usable()` checks they are what it was written against, and the worker
falls back to mlx-lm's BatchGenerator (with a log line) if not, or when `models.fast_joins` is
false.
"""

from __future__ import annotations

import functools
import importlib
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional

from appliance.engine.mlx_ext import mixed

G: Any = importlib.import_module(
    "mlx_lm.generate"
)  # the module (mlx_lm.generate is also a function)
_cache: Any = importlib.import_module("mlx_lm.models.cache")

TARGETS = "mlx-lm 0.32 (generate.BatchGenerator, GenerationBatch, PromptProcessingBatch)"

# What this module relies on in mlx-lm 0.32, checked by usable().
_EXPECTED = {
    "BatchGenerator": ("_next", "_make_batch", "insert", "remove", "next"),
    "GenerationBatch": ("_step", "next", "filter", "extend", "extract_cache", "empty", "Response"),
    "PromptProcessingBatch": ("prompt", "split", "filter", "empty", "Response"),
}


def usable() -> bool:
    """Whether mlx-lm's batching internals are the ones this module extends."""
    import mlx_lm

    if not str(getattr(mlx_lm, "__version__", "")).startswith("0.32."):
        return False
    for cls_name, members in _EXPECTED.items():
        cls = getattr(G, cls_name, None)
        if cls is None or not all(hasattr(cls, m) for m in members):
            return False
    return all(
        hasattr(G, f) for f in ("_extend_cache", "TokenBuffer", "_right_pad_prompts")
    ) and hasattr(_cache, "BatchKVCache")


@functools.cache
def _no_logprobs() -> Any:
    """What a primed row's step holds for its log-probabilities (never reported): an evaluated
    array, so evaluating the step's log-probabilities costs nothing for it."""
    import mlx.core as mx

    a = mx.zeros((1,))
    mx.eval(a)
    return a


def _homogeneous(caches: list[Any]) -> bool:
    """Every layer a BatchKVCache at the same position: then they share their left padding."""
    if not caches:
        return False
    first = caches[0]
    return all(
        type(c) is _cache.BatchKVCache
        and c._idx == first._idx
        and (c.keys is None) == (first.keys is None)
        for c in caches
    )


def _filter_caches(caches: list[Any], keep: list[int]) -> None:
    """BatchKVCache.filter on every layer, reading the left padding once for all of them."""
    import mlx.core as mx

    idx = mx.array(keep)
    padding = caches[0].left_padding[idx]
    mx.eval(padding)
    pad = padding.tolist()
    trim = min(pad)  # shift left to drop the padding every row has
    if trim > 0:
        pad = [p - trim for p in pad]
    for c in caches:
        if c.keys is not None:
            c.keys = c.keys[idx]
            c.values = c.values[idx]
            if trim > 0:
                c.keys = c.keys[..., trim:, :]
                c.values = c.values[..., trim:, :]
        c.offset = c.offset[idx]
        c._idx -= trim
        c.left_padding = mx.array(pad)


def _extract_rows(caches: list[Any], rows: list[int]) -> list[list[Any]]:
    """Each row's cache (one KVCache a layer, its padding cut), as BatchKVCache.extract gives,
    reading the left padding once for every layer rather than once a layer."""
    import mlx.core as mx

    if not _homogeneous(caches):
        return [[c.extract(i) for c in caches] for i in rows]
    mx.eval(caches[0].left_padding)
    pad = caches[0].left_padding.tolist()
    end = caches[0]._idx
    out = []
    for i in rows:
        layers = []
        for c in caches:
            kv = _cache.KVCache()
            kv.keys = mx.contiguous(c.keys[i : i + 1, :, pad[i] : end])
            kv.values = mx.contiguous(c.values[i : i + 1, :, pad[i] : end])
            kv.offset = kv.keys.shape[2]
            layers.append(kv)
        out.append(layers)
    return out


def _prefill_chunk(batch: Any, tokens: list[list[int]], wait: bool = True) -> None:
    """PromptProcessingBatch.prompt for one chunk (each row's tokens at most prefill_step_size),
    without emptying MLX's buffer cache after it. mlx-lm empties it after every chunk, and with
    a chunk a step (prefill beside decoding streams) every step then allocated its buffers anew:
    on an H100 with the 1B shape, 2.5 ms of a 21 ms step that prefilled 235 tokens. The cache
    is emptied when a prompt's prefill ends instead (BatchGenerator._join_ready).

    `wait` False (other rows decode): the chunk is launched, not waited for. mlx-lm waits for
    every chunk, so beside decoding streams the device then sat idle while the next step's graph
    was built; launched, the chunk runs on the stream while it is, and the next step's own wait
    (the same stream, in order) bounds how many chunks are ever in flight."""
    import mlx.core as mx

    settle = mx.eval if wait else mx.async_eval

    if len(batch.uids) != len(tokens):
        raise ValueError("The batch length doesn't match the number of inputs")
    if not tokens:
        return
    for sti, ti in zip(batch.tokens, tokens, strict=True):
        sti += ti
    lengths = [len(p) for p in tokens]
    longest = max(lengths)
    padding = [longest - n for n in lengths]
    if max(padding) > 0:
        x = G._right_pad_prompts(tokens, max_length=longest)
        for c in batch.prompt_cache:
            c.prepare(lengths=lengths, right_padding=padding)
    else:
        x = mx.array(tokens)
    batch.model(x, cache=batch.prompt_cache)
    settle([c.state for c in batch.prompt_cache])
    if max(padding) > 0:
        for c in batch.prompt_cache:
            c.finalize()
        settle([c.state for c in batch.prompt_cache])


class GenerationBatch(G.GenerationBatch):  # type: ignore[misc]
    """A generation batch whose rows can join primed: their first input is their prompt's last
    token, and the step that feeds it yields no response for them."""

    prompt_cache: list[Any]
    model: Any
    _next_tokens: Any
    solo = True  # a lone row decodes through plain KV caches (off only for an A/B)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._solo = False
        self._no_solo = (
            False  # the lone row's caches can't go solo: not checked again until a change
        )
        super().__init__(*args, **kwargs)
        self._primed: list[bool] = [False] * len(self.uids)
        # A prompt chunk to prefill in the next step's forward pass (BatchGenerator's mixed
        # steps): its tokens (rows x length) and the prompt batch's caches.
        self.rider: Optional[tuple[Any, list[Any]]] = None

    def _step(self) -> Any:
        rider, self.rider = self.rider, None
        if rider is None:
            return super()._step()
        plain = self.model

        def both(inputs: Any, cache: Any = None) -> Any:
            return mixed.forward(plain, inputs, cache, rider[0], rider[1])

        self.model = both
        try:
            return super()._step()
        finally:
            self.model = plain

    def _go_solo(self) -> None:
        """A lone row decodes through plain KVCaches over the same buffers: the model then runs
        without an attention mask and with a scalar position, as mlx-lm's single-stream
        generate_step does (the module's docstring has the measurements). No copy either way."""
        if not self.solo or self._solo or self._no_solo or len(self.uids) != 1:
            return
        caches = self.prompt_cache
        if not _homogeneous(caches):
            self._no_solo = True  # e.g. rotating caches: not walked again every step
            return
        if caches[0].keys is None:
            return
        pad = int(caches[0].left_padding[0].item())  # 0 in practice: leaves trim common padding
        solo = []
        for c in caches:
            k = _cache.KVCache()
            k.keys, k.values = (
                (c.keys[..., pad:, :], c.values[..., pad:, :]) if pad else (c.keys, c.values)
            )
            k.offset = c._idx - pad
            solo.append(k)
        self.prompt_cache = solo
        self._solo = True

    def _unsolo(self) -> None:
        """Back to BatchKVCaches (no padding, the same buffers) before anything that works on rows
        (and the batch may change: solo is considered again)."""
        self._no_solo = False
        if not self._solo:
            return
        import mlx.core as mx

        batch = []
        for k in self.prompt_cache:
            c = _cache.BatchKVCache([0])
            c.keys, c.values, c._idx = k.keys, k.values, k.offset
            c.offset = mx.array([k.offset])
            batch.append(c)
        self.prompt_cache = batch
        self._solo = False

    def join(self, batch: Any, last_tokens: list[int]) -> None:
        """Take a prefilled PromptProcessingBatch's rows into this batch: their caches merge into
        ours now, and the next step feeds their last prompt tokens along with everyone's."""
        import mlx.core as mx

        self._unsolo()
        n = len(batch.uids)
        self.uids.extend(batch.uids)
        self.prompt_cache = G._extend_cache(self.prompt_cache, batch.prompt_cache)
        self.tokens.extend(batch.tokens)
        self.samplers.extend(batch.samplers)
        self.logits_processors.extend(batch.logits_processors)
        self.max_tokens.extend(batch.max_tokens)
        self.stop_sequences.extend(batch.stop_sequences)
        last = mx.array(last_tokens, dtype=mx.uint32)
        if self._next_tokens is None or self._next_tokens.size == 0:
            self._next_tokens = last
        else:
            self._next_tokens = mx.concatenate(
                [self._next_tokens, last.astype(self._next_tokens.dtype)]
            )
        self._next_logprobs.extend([_no_logprobs()] * n)
        self._token_context.extend(G.TokenBuffer(t) for t in batch.tokens)
        self._num_tokens.extend([0] * n)
        self._matchers.extend(ss.matcher() for ss in batch.stop_sequences)
        self._primed.extend([True] * n)
        batch.uids, batch.prompt_cache, batch.tokens = [], [], []
        batch.samplers, batch.logits_processors, batch.max_tokens = [], [], []
        batch.stop_sequences = []

    def extend(self, batch: Any) -> None:
        self._unsolo()
        super().extend(batch)
        self._primed.extend(getattr(batch, "_primed", None) or [False] * len(batch.uids))

    def extract_cache(self, idx: int) -> list[Any]:
        import mlx.core as mx

        self._unsolo()
        # one round trip for every layer's padding, not one per layer
        mx.eval([c.left_padding for c in self.prompt_cache if hasattr(c, "left_padding")])
        return super().extract_cache(idx)

    def filter(self, keep: list[int]) -> None:
        self._unsolo()
        if not keep or not _homogeneous(self.prompt_cache):
            super().filter(keep)
        else:
            caches = self.prompt_cache
            self.prompt_cache = []  # the base filter's cache pass becomes a no-op
            super().filter(keep)
            self.prompt_cache = caches
            _filter_caches(caches, keep)
        self._primed = [self._primed[i] for i in keep]

    def next(self) -> list[Any]:
        if not self.uids:
            return []
        self._go_solo()
        if not any(self._primed):
            return super().next()  # type: ignore[no-any-return]
        # As GenerationBatch.next, but a primed row's step only fed its last prompt token.
        primed = self._primed
        self._primed = [False] * len(self.uids)
        tokens, logprobs = self._step()
        keep: list[int] = []
        responses: list[Any] = []
        for i in range(len(self.uids)):
            if primed[i]:
                keep.append(i)
                continue
            finish_reason = None
            self._num_tokens[i] += 1
            if self._num_tokens[i] >= self.max_tokens[i]:
                finish_reason = "length"
            if self._matchers[i].advance(tokens[i]):
                finish_reason = "stop"
            done = finish_reason is not None
            responses.append(
                self.Response(
                    uid=self.uids[i],
                    token=tokens[i],
                    logprobs=logprobs[i],
                    finish_reason=finish_reason,
                    prompt_cache=self.extract_cache(i) if done else None,
                    all_tokens=self.tokens[i] if done else None,
                )
            )
            if not done:
                keep.append(i)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses


class PrefillBudget:
    """How many prompt tokens a step prefills while other sequences decode.

    mlx-lm prefills `prefill_step_size` tokens of every waiting prompt between two decode steps,
    so a long arrival holds each running stream for as long as a whole chunk takes: about a
    second a chunk for the demo model on two CPU cores, where a decode step takes 3-4 ms. With
    a budget the chunks shrink while anyone decodes: `limit` tokens a step (across the prompts,
    counting the padding of the shorter ones), or with `limit` 0 as many as the learnt cost of
    a step's prefill allows. Alone, prompts prefill in whole `prefill_step_size` chunks.
    `limit` None: no budget (mlx-lm's way).

    The learnt budget charges what a call costs beyond a steady decode step to the tokens it
    prefilled (one cost a token) and takes as many as fit in SHARE of a steady step. A step that
    prefills at all also pays a fixed part (the layers run once more, their kernels launched),
    which that charge makes small chunks look dear: on two CPU cores with the demo model (fixed
    2.4 ms, 0.35 ms a token, a decode step 2.7 ms) the budget falls to a token a row, and a
    prompt arriving beside a long answer mostly waits for it to end. With `fixed_part` on, the
    cost is fitted as a fixed part plus a cost for each token of the call's own chunk and of
    the chunk before (a chunk launched beside decoding runs while the next call builds its
    step), by least squares over the last WINDOW calls around prefills, and SHARE of a steady
    step goes to the tokens beyond the fixed part; chunk sizes then follow a pattern of two calls
    at 1 + DITHER of the budget and two at 1 - DITHER (a token a row at least), so that the parts
    can be told apart."""

    # Off: one cost a token, the fixed part included. On only for an A/B (prefill_anatomy's
    # "-line" configurations): on two CPU cores it prefilled 1,000 tokens beside three long
    # answers in 2.8-4.1 s against 3.1-6.5 s, but in the agent scenario its long prompts
    # finished, and joined the batch, while the others still decoded, and their worst gaps grew
    # (docs/performance.md).
    fixed_part = False
    SHARE = 0.75
    FLOOR = 1  # tokens a row at least (a learnt budget below it would stop the prefill)
    START = 8  # tokens a row before anything is measured
    EMA = 0.2
    WINDOW = 32  # calls the cost is fitted over
    DITHER = 0.25
    # A call is counted as at most this many times what was learnt: one slow call (a kernel MLX
    # compiles the first time a shape comes, 0.1-1.5 s on CUDA) must not set the budget for
    # the next dozens
    OUTLIER = 4.0
    # A fitted cost a token is not believed below this share of the average cost a token
    # (noise in a near-flat fit would otherwise allow huge chunks)
    MIN_MARGINAL = 0.1

    def __init__(self, limit: Optional[int], step: int) -> None:
        self.limit = limit
        self.step = step
        self.forget()

    def forget(self) -> None:
        """Drop what was learnt: the warm-up's steps include MLX compiling its kernels (on CUDA a
        step of 1.1 s, where a steady one takes 5 ms, and the budget of the first requests after
        it was no budget at all)."""
        self.step_s: Optional[float] = None  # a steady decode step, smoothed
        self.token_s: Optional[float] = None  # what one more prefilled token costs
        self.fixed_s = 0.0  # what a call's prefill costs whatever its size
        self.last = 0  # the learnt total of the step before (it may at most double a step)
        self._samples: deque[tuple[int, int, float]] = deque(maxlen=self.WINDOW)
        self._phase = 0  # where the next step is in the dither's pattern

    def per_row(self, rows: int, decoding: bool) -> int:
        """Tokens each of `rows` prompts may prefill in this step."""
        if self.limit is None or not decoding or rows == 0:
            return self.step
        if self.limit > 0:
            total = self.limit
        elif self.step_s is None or self.token_s is None:
            total = self.last = self.START * rows  # nothing measured yet: start small, learn
        else:
            total = int(self.SHARE * self.step_s / max(self.token_s, 1e-9))
            # a noisy measurement must not turn into one long stall: grow at most twofold
            total = min(total, max(self.START * rows, 2 * self.last))
            self.last = total
            per = max(self.FLOOR, min(self.step, total // rows))
            if not self.fixed_part:
                return per
            self._phase = (self._phase + 1) % 4
            delta = max(1, round(per * self.DITHER))  # a token a row at least: sizes differ
            return min(self.step, per + delta) if self._phase < 2 else max(self.FLOOR, per - delta)
        return max(self.FLOOR, min(self.step, total // rows))

    def decoded(self, seconds: float) -> None:
        """A call that stepped the running batch, with no prefill in it or just before it, took
        `seconds`."""
        if self.step_s is not None:
            seconds = min(seconds, self.OUTLIER * self.step_s)
        self.step_s = _smooth(self.step_s, seconds, self.EMA)

    def prefilled(self, tokens: int, before: int, seconds: float, step_s: float) -> None:
        """A call that stepped the batch (its own wait `step_s`) then prefilled `tokens`, the
        call before it `before` (padding included), took `seconds` in all."""
        if not self.fixed_part and not tokens:  # the call after a prefill, as a steady one
            self.decoded(seconds)
            return
        if self.step_s is None:  # no steady step seen yet: its own wait is the best guess
            self.step_s = step_s
        if not self.fixed_part:  # one cost a token, the fixed part included
            each = max(seconds - self.step_s, 0.0) / tokens
            if self.token_s:
                each = min(each, self.OUTLIER * self.token_s)
            self.token_s = _smooth(self.token_s, each, self.EMA)
            return
        self._samples.append((tokens, before, max(seconds - self.step_s, 0.0)))
        self.fixed_s, self.token_s = _fit_cost(self._samples, self.MIN_MARGINAL)


def _fit_cost(samples: Sequence[tuple[int, int, float]], min_share: float) -> tuple[float, float]:
    """(fixed, a token) of cost = fixed + a x (tokens + tokens before) with the two token counts
    fitted apart, over (tokens, tokens before, cost) samples by least squares; the average cost a
    token (no fixed part) where the fit can't say, and at least `min_share` of it."""
    import numpy as np

    rows = np.asarray(samples, dtype=np.float64)
    tokens = float(rows[:, 0].sum())
    average = float(rows[:, 2].sum()) / max(tokens, 1.0)
    if len(rows) < 6:
        return 0.0, average
    x = np.column_stack([np.ones(len(rows)), rows[:, 0], rows[:, 1]])
    coef, _, rank, _ = np.linalg.lstsq(x, rows[:, 2], rcond=None)
    fixed, per_token = float(coef[0]), float(coef[1] + coef[2])
    if rank < 3 or fixed < 0 or per_token <= 0:
        return 0.0, average
    return fixed, max(per_token, min_share * average)


def _smooth(old: Optional[float], new: float, weight: float) -> float:
    return new if old is None else old + weight * (new - old)


class BatchGenerator(G.BatchGenerator):  # type: ignore[misc]
    """mlx-lm's BatchGenerator, joining prefilled prompts into the running batch directly."""

    _prompt_batch: Any
    _generation_batch: Any
    _currently_processing: list[Any]
    _unprocessed_sequences: Any
    _counters: Any
    launch_prefill = True  # beside decoding rows a chunk is launched, not waited for (A/B only)
    # Beside decoding rows a lone prompt's chunk runs in the decode step's forward pass, where
    # the model allows (mixed.supports); off only for an A/B
    mixed_prefill = True

    def __init__(self, model: Any, *, prefill_budget: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._generation_batch = GenerationBatch.empty(self.model, self.sampler)
        self.budget = PrefillBudget(prefill_budget, self.prefill_step_size)
        # With keep_prefilled, each prompt's cache as its prefill ends (its tokens but the last,
        # the KV): taken by the worker into the prompt cache, so that sessions arriving while
        # this one still generates find the prefix they share (a system prompt and tools).
        self.keep_prefilled = False
        self.prefilled: list[tuple[list[int], list[Any]]] = []
        self._before = 0  # prompt tokens the call before prefilled beside decoding
        self._mixes = mixed.supports(self.model)

    def _empty_prompt_batch(self) -> Any:
        return G.PromptProcessingBatch.empty(
            self.model, self.sampler, prefill_step_size=self.prefill_step_size
        )

    def _join_ready(self, prompt_responses: list[Any], *, prefilled: bool) -> None:
        """Move every prompt row whose only input left is its last token into the running batch:
        primed if its prefill just ran (the next step feeds that token with everyone's), else
        (a one-token prompt, a whole prompt found in the cache) as mlx-lm does, with a forward
        pass of its own now, so that its first token comes no later than there."""
        ready = [
            i
            for i, seq in enumerate(self._currently_processing)
            if len(seq[0]) == 1 and len(seq[0][0]) == 1
        ]
        if not ready:
            return
        if prefilled and len(self._generation_batch) >= self.completion_batch_size:
            return  # mlx-lm would keep them in the prompt batch: they join at a later call
        last = [self._currently_processing[i][0][0][0] for i in ready]
        totals = [self._currently_processing[i][2] for i in ready]
        if prefilled and self.keep_prefilled:
            caches = _extract_rows(self._prompt_batch.prompt_cache, ready)
            for i, cache in zip(ready, caches, strict=True):
                self.prefilled.append((list(self._prompt_batch.tokens[i]), cache))
        if len(ready) == len(self._prompt_batch):
            batch = self._prompt_batch  # all of it: no copy
            self._prompt_batch = self._empty_prompt_batch()
            self._currently_processing = []
        else:
            batch = self._prompt_batch.split(ready)
            gone = set(ready)
            self._currently_processing = [
                s for i, s in enumerate(self._currently_processing) if i not in gone
            ]
        for uid, total in zip(batch.uids, totals, strict=True):
            prompt_responses.append(
                G.PromptProcessingBatch.Response(uid, (total, total), True, True)
            )
        if prefilled:
            self._generation_batch.join(batch, last)
            import mlx.core as mx

            mx.clear_cache()  # once a prompt, not once a chunk (_prefill_chunk)
        else:
            self._generation_batch.extend(batch.generate([[t] for t in last]))

    def _next(self) -> tuple[list[Any], list[Any]]:
        import time

        # Timed whole: MLX runs a decode step and the prefill after it on one stream, so the
        # prefill's wait includes the step; the step's share is what a steady step takes. A
        # chunk launched beside decoding runs while the next call builds its step, so the
        # budget hears of the chunk before as well.
        self._decode_s = 0.0
        self._prefilled = 0
        before, self._before = self._before, 0
        tic = time.perf_counter()
        out = self._step_and_prefill()
        if self._decode_s > 0:
            took = time.perf_counter() - tic
            self._before = self._prefilled
            if self._prefilled or before:
                self.budget.prefilled(self._prefilled, before, took, self._decode_s)
            else:
                self.budget.decoded(took)
        return out

    def _step_and_prefill(self) -> tuple[list[Any], list[Any]]:
        import time

        import mlx.core as mx

        generation_responses: list[Any] = []
        prompt_responses: list[Any] = []
        counters = self._counters
        # Rows joined primed at the last call: mlx-lm would still hold them in the prompt batch
        # until this call's split, so its limits count them there, and so do these.
        primed = sum(self._generation_batch._primed)

        if self._mixed_step_fits(primed):
            return self._mixed_step(primed)

        if len(self._generation_batch) > 0:
            tic = time.perf_counter()
            generation_responses = self._generation_batch.next()
            self._decode_s = time.perf_counter() - tic
            counters.decode_time += self._decode_s
            counters.generation_tokens += len(generation_responses)
            counters.generation_steps += 1
            if counters.generation_steps % 512 == 0:
                mx.clear_cache()

        if len(self._generation_batch) - primed >= self.completion_batch_size:
            return prompt_responses, generation_responses

        n = min(
            self.prefill_batch_size - len(self._prompt_batch) - primed,
            self.completion_batch_size - len(self._generation_batch) + primed,
            len(self._unprocessed_sequences),
        )
        if n > 0:
            self._prompt_batch.extend(self._make_batch(n))

        # Rows with nothing but their last token left (a one-token prompt, a full cache hit)
        self._join_ready(prompt_responses, prefilled=False)

        # A step ran in this call: its tokens reach their streams only when the call returns,
        # after the prefill below, even those of rows that just ended (so: not "rows left").
        decoding = self._decode_s > 0
        step = self.budget.per_row(len(self._currently_processing), decoding)
        prompts = self._take_chunks(step, prompt_responses)
        counters.prompt_tokens += sum(len(p) for p in prompts)
        tic = time.perf_counter()
        _prefill_chunk(self._prompt_batch, prompts, wait=not (decoding and self.launch_prefill))
        counters.prompt_time += time.perf_counter() - tic
        if prompts and decoding:
            self._prefilled = len(prompts) * max(len(p) for p in prompts)

        # ...and those whose prefill just finished: their last token goes into the next step.
        self._join_ready(prompt_responses, prefilled=True)
        return prompt_responses, generation_responses

    def _take_chunks(self, step: int, prompt_responses: list[Any]) -> list[list[int]]:
        """Each prompt row's next chunk (at most `step` tokens of its current segment), taken
        off its segments, with a progress response for each row."""
        prompts = []
        for i, seq in enumerate(self._currently_processing):
            response = G.PromptProcessingBatch.Response(self._prompt_batch.uids[i], 0, False, False)
            segments = seq[0]
            k = min(len(segments[0]), step)
            prompts.append(segments[0][:k])
            segments[0] = segments[0][k:]
            if len(segments[0]) == 0:
                segments.pop(0)
                response.end_of_segment = True
            seq[1] += len(prompts[-1])
            response.progress = (seq[1], seq[2])
            prompt_responses.append(response)
        return prompts

    def _mixed_step_fits(self, primed: int) -> bool:
        """Whether this call's decode step can carry the prefill chunk (mixed.forward): rows
        decode with room beside them, and one prompt is being prefilled with more than its last
        token left (that one goes into a decode step as a primed row)."""
        if not (self.mixed_prefill and self._mixes and len(self._currently_processing) == 1):
            return False
        gen = self._generation_batch
        if not len(gen) or len(gen) - primed >= self.completion_batch_size:
            return False
        segments = self._currently_processing[0][0]
        return len(self._prompt_batch) == 1 and not (len(segments) == 1 and len(segments[0]) == 1)

    def _mixed_step(self, primed: int) -> tuple[list[Any], list[Any]]:
        """_step_and_prefill with the lone prompt's chunk in the decode step's forward pass; new
        arrivals join the prompt batch after it (their prefill starts at the next call), under
        the same limits."""
        import time

        import mlx.core as mx

        counters = self._counters
        prompt_responses: list[Any] = []
        prompts = self._take_chunks(self.budget.per_row(1, True), prompt_responses)
        batch = self._prompt_batch
        batch.tokens[0] += prompts[0]
        self._generation_batch.rider = (mx.array(prompts), batch.prompt_cache)
        tic = time.perf_counter()
        try:
            generation_responses = self._generation_batch.next()
        finally:
            self._generation_batch.rider = None
        self._decode_s = time.perf_counter() - tic
        mx.async_eval([c.state for c in batch.prompt_cache])
        counters.decode_time += self._decode_s
        counters.generation_tokens += len(generation_responses)
        counters.generation_steps += 1
        if counters.generation_steps % 512 == 0:
            mx.clear_cache()
        counters.prompt_tokens += len(prompts[0])
        self._prefilled = len(prompts[0])
        n = min(
            self.prefill_batch_size - len(self._prompt_batch) - primed,
            self.completion_batch_size - len(self._generation_batch) + primed,
            len(self._unprocessed_sequences),
        )
        self._join_ready(prompt_responses, prefilled=True)
        if n > 0:
            self._prompt_batch.extend(self._make_batch(n))
            self._join_ready(prompt_responses, prefilled=False)
        return prompt_responses, generation_responses
