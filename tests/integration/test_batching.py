"""appliance.engine.batching against mlx-lm's own BatchGenerator, on the real demo model: the
same schedule of joins, leaves and cancels gives the same tokens, in the same calls, with the
same log-probabilities."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from appliance.engine.mlx_ext import batching

pytestmark = pytest.mark.timeout(300)

G: Any = importlib.import_module("mlx_lm.generate")
_cache: Any = importlib.import_module("mlx_lm.models.cache")


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> Any:
    from mlx_lm.utils import load

    m, _ = load(str(demo_model_dir))
    return m


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 200 + 3 for i in range(n)]


def _drive(
    cls: Any,
    model: Any,
    *,
    prefill_step_size: int = 2048,
    extra: Any = None,
    only_extra: bool = False,
    stop_tokens: Any = ((7,),),
    solo: list[bool] | None = None,
) -> list[list[tuple[Any, ...]]]:
    """Runs one fixed schedule (or only `extra`'s); returns, per next() call, (uid, token,
    finish, logprob of the token) for every response. `solo` collects, per call, whether the
    running batch decoded as a lone row (appliance's class only)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors

    gen = cls(
        model,
        stop_tokens=[list(t) for t in stop_tokens],
        completion_batch_size=8,
        prefill_batch_size=8,
        prefill_step_size=prefill_step_size,
    )
    calls: list[list[tuple[Any, ...]]] = []
    schedule: dict[int, Any] = {
        0: lambda: gen.insert(
            [_prompt(9, 1), _prompt(14, 2), _prompt(5, 3)], max_tokens=[12, 20, 6]
        ),
        # one-token prompt, a long one (chunked when prefill_step_size is small), a penalty
        4: lambda: gen.insert(
            [_prompt(1, 4), _prompt(40, 5), _prompt(11, 6)],
            max_tokens=[9, 15, 10],
            logits_processors=[[], [], make_logits_processors(repetition_penalty=1.3)],
        ),
        7: lambda: gen.remove([1]),  # a cancel while others run
        9: lambda: gen.insert([_prompt(6, 7)], max_tokens=[8]),
        10: lambda: gen.insert([_prompt(3, 8), _prompt(17, 9)], max_tokens=[5, 7]),
    }
    if only_extra:
        schedule.clear()
    if extra:
        schedule.update(extra(gen))
    for step in range(200):
        if step in schedule:
            schedule[step]()
        _, responses = gen.next()
        out = []
        for r in responses:
            lp = float(r.logprobs[r.token].item())
            out.append((r.uid, r.token, r.finish_reason, lp))
        calls.append(out)
        if solo is not None:
            solo.append(gen._generation_batch._solo)
        if (
            step > max(schedule)
            and not len(gen._generation_batch)
            and not len(gen._prompt_batch)
            and not gen._unprocessed_sequences
        ):
            break
    mx.synchronize()
    gen.close()
    return calls


@pytest.mark.parametrize("prefill_step_size", [2048, 8])
def test_same_tokens_in_the_same_calls(model: Any, prefill_step_size: int) -> None:
    assert batching.usable()
    stock = _drive(G.BatchGenerator, model, prefill_step_size=prefill_step_size)
    ours = _drive(batching.BatchGenerator, model, prefill_step_size=prefill_step_size)
    assert [[r[:3] for r in c] for c in ours] == [[r[:3] for r in c] for c in stock]
    flat_ours = [r[3] for c in ours for r in c]
    flat_stock = [r[3] for c in stock for r in c]
    assert flat_ours == pytest.approx(flat_stock, abs=1e-3)
    # the schedule did what it says: every request ended, one of them cancelled
    ended = {r[0] for c in stock for r in c if r[2] is not None}
    assert ended == set(range(9)) - {1}
    assert any(r[2] == "length" for c in stock for r in c)


def test_a_batch_that_empties_and_refills(model: Any) -> None:
    """Everyone leaves, then a new wave joins an empty batch, twice."""

    def waves(gen: Any) -> dict[int, Any]:
        return {
            60: lambda: gen.insert([_prompt(8, 10), _prompt(12, 11)], max_tokens=[4, 4]),
            80: lambda: gen.insert([_prompt(2, 12)], max_tokens=[3]),
        }

    stock = _drive(G.BatchGenerator, model, extra=waves)
    ours = _drive(batching.BatchGenerator, model, extra=waves)
    assert [[r[:3] for r in c] for c in ours] == [[r[:3] for r in c] for c in stock]
    assert sum(1 for c in ours for r in c if r[2] is not None) == 11


def test_a_lone_stream_decodes_solo(model: Any) -> None:
    """A row alone in the batch decodes through plain KV caches (no mask, a scalar position),
    goes back to the batch when another joins and solo again when that one leaves: the same
    tokens, in the same calls, with the same log-probabilities as mlx-lm's batched path."""

    def lone(gen: Any) -> dict[int, Any]:
        return {
            0: lambda: gen.insert([_prompt(9, 21)], max_tokens=[60]),
            12: lambda: gen.insert([_prompt(30, 22)], max_tokens=[10]),
        }

    solo: list[bool] = []
    never = ((10**6,),)  # no stop token: the lengths are the schedule's
    stock = _drive(G.BatchGenerator, model, extra=lone, only_extra=True, stop_tokens=never)
    ours = _drive(
        batching.BatchGenerator, model, extra=lone, only_extra=True, stop_tokens=never, solo=solo
    )
    assert [[r[:3] for r in c] for c in ours] == [[r[:3] for r in c] for c in stock]
    flat_ours = [r[3] for c in ours for r in c]
    flat_stock = [r[3] for c in stock for r in c]
    assert flat_ours == pytest.approx(flat_stock, abs=1e-3)
    assert len([r for c in ours for r in c if r[0] == 0]) == 60
    # alone, then joined (batched), then alone again
    assert solo[5] and not solo[16] and solo[40], solo


def test_a_padded_lone_row_goes_solo_past_its_padding(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leaves trim the padding every row shares, so a lone row has none; were it padded, solo
    decoding starts past the padding: junk put in front of the lone row's cache just before it
    goes solo changes nothing."""
    import mlx.core as mx

    go_solo = batching.GenerationBatch._go_solo
    forced: list[int] = []

    def padded_then_solo(self: Any) -> None:
        caches = self.prompt_cache
        if (
            not forced
            and not self._solo
            and len(self.uids) == 1
            and batching._homogeneous(caches)
            and caches[0].keys is not None
        ):
            for c in caches:
                junk = (mx.random.normal((1, c.keys.shape[1], 5, c.keys.shape[3])) * 5).astype(
                    c.keys.dtype
                )
                c.keys = mx.concatenate([junk, c.keys], axis=2)
                c.values = mx.concatenate([junk, c.values], axis=2)
                c._idx += 5
                c.left_padding = c.left_padding + 5
            forced.append(5)
        go_solo(self)

    def lone(gen: Any) -> dict[int, Any]:
        return {
            0: lambda: gen.insert([_prompt(9, 31)], max_tokens=[40]),
            12: lambda: gen.insert([_prompt(20, 32)], max_tokens=[8]),
        }

    never = ((10**6,),)
    stock = _drive(G.BatchGenerator, model, extra=lone, only_extra=True, stop_tokens=never)
    monkeypatch.setattr(batching.GenerationBatch, "_go_solo", padded_then_solo)
    solo: list[bool] = []
    ours = _drive(
        batching.BatchGenerator, model, extra=lone, only_extra=True, stop_tokens=never, solo=solo
    )
    assert forced and solo[5] and not solo[14] and solo[30], solo
    assert [[r[:3] for r in c] for c in ours] == [[r[:3] for r in c] for c in stock]
    assert [r[3] for c in ours for r in c] == pytest.approx(
        [r[3] for c in stock for r in c], abs=1e-3
    )


class _Echo:
    """A tiny stand-in model whose next token follows from the current one and whose KV cache
    holds the tokens it saw: schedules run in milliseconds, and a wrong cache, a token in the
    wrong call or a different admission shows in the outputs."""

    vocab = 50

    def __init__(self) -> None:
        self.layers = [0, 0]

    def make_cache(self) -> list[Any]:
        from mlx_lm.models.cache import KVCache

        return [KVCache(), KVCache()]

    def __call__(self, x: Any, cache: Any) -> Any:
        import mlx.core as mx

        b, t = x.shape
        for c in cache:
            k = mx.broadcast_to(x.astype(mx.float32)[:, None, :, None], (b, 1, t, 2))
            c.update_and_fetch(k, k)
        nxt = (x.astype(mx.int32) + 1) % (self.vocab - 3) + 3
        return mx.eye(self.vocab)[nxt] * 10


class _RotatingEcho(_Echo):
    def make_cache(self) -> list[Any]:
        from mlx_lm.models.cache import RotatingKVCache

        return [RotatingKVCache(max_size=16), RotatingKVCache(max_size=16)]


def test_a_lone_row_with_rotating_caches_stays_batched() -> None:
    """Solo decoding is for plain KV caches only: with rotating caches a lone row stays on
    mlx-lm's batched path, with its tokens, decided once rather than at every step."""

    def run(cls: Any) -> tuple[list[int], Any]:
        gen = cls(_RotatingEcho(), stop_tokens=[[1]], completion_batch_size=4, prefill_batch_size=4)
        gen.insert([[5, 6, 7, 8, 9]], max_tokens=[30])
        tokens: list[int] = []
        seen: Any = None
        for i in range(40):
            tokens += [r.token for r in gen.next()[1]]
            if i == 10:  # mid-run, alone
                b = gen._generation_batch
                seen = (
                    type(b.prompt_cache[0]).__name__,
                    getattr(b, "_solo", None),
                    getattr(b, "_no_solo", None),
                )
        gen.close()
        return tokens, seen

    stock, _ = run(G.BatchGenerator)
    ours, seen = run(batching.BatchGenerator)
    assert ours == stock and len(ours) == 30
    assert seen == ("BatchRotatingKVCache", False, True)  # batched; the check is not repeated


def _drive_random(cls: Any, cbs: int, pbs: int, step: int, schedule: dict[int, Any]) -> list[Any]:
    gen = cls(
        _Echo(),
        completion_batch_size=cbs,
        prefill_batch_size=pbs,
        prefill_step_size=step,
        stop_tokens=[[1]],
    )
    out: list[Any] = []
    for i in range(40):
        if i in schedule:
            kind, arg = schedule[i]
            if kind == "insert":
                gen.insert(*arg)
            else:  # a cancel, with the cache it had
                gone = gen.remove([arg], return_prompt_caches=True)
                out.append(
                    (
                        "removed",
                        {
                            u: (
                                c[0][0].keys[..., 0].tolist()
                                if c[0] and c[0][0].keys is not None
                                else None,
                                list(c[1]),
                            )
                            for u, c in gone.items()
                        },
                    )
                )
        _, responses = gen.next()
        out.append(
            [
                (
                    r.uid,
                    r.token,
                    r.finish_reason,
                    None
                    if r.prompt_cache is None
                    else (r.prompt_cache[1].keys[0, 0, :, 0].tolist(), list(r.all_tokens)),
                )
                for r in responses
            ]
        )
    return out


def test_random_schedules_match_mlx_lm() -> None:
    """Batch limits, prefill chunking, joins while others prefill, cancels at any stage: the same
    responses in the same calls, and the same caches handed back, as mlx-lm's BatchGenerator."""
    import random

    rng = random.Random(7)
    for _ in range(120):
        cbs = rng.randint(1, 6)
        pbs = rng.randint(1, cbs + 2)
        step = rng.randint(1, 6)
        schedule: dict[int, Any] = {}
        for _ in range(rng.randint(1, 6)):
            k = rng.randint(1, 4)
            prompts = [[rng.randint(3, 40) for _ in range(rng.randint(1, 12))] for _ in range(k)]
            schedule[rng.randint(0, 15)] = (
                "insert",
                (prompts, [rng.randint(1, 8) for _ in range(k)]),
            )
        for _ in range(rng.randint(0, 3)):
            schedule.setdefault(rng.randint(0, 20), ("remove", rng.randint(0, 8)))
        stock = _drive_random(G.BatchGenerator, cbs, pbs, step, schedule)
        ours = _drive_random(batching.BatchGenerator, cbs, pbs, step, schedule)
        assert ours == stock, (cbs, pbs, step, schedule)


def _budget_run(
    model: Any, budget: Any, mixed_prefill: bool = True
) -> tuple[dict[int, list[int]], list[int], int]:
    """One row decoding, then a 300-token prompt arriving: the tokens of each row, the prompt
    tokens prefilled by each next() call while the first row decoded, and the calls that took."""
    gen = batching.BatchGenerator(
        model,
        stop_tokens=[[7]],
        completion_batch_size=8,
        prefill_batch_size=8,
        prefill_step_size=128,
        prefill_budget=budget,
    )
    gen.mixed_prefill = mixed_prefill
    tokens: dict[int, list[int]] = {}
    (first,) = gen.insert([_prompt(9, 1)], max_tokens=[120])
    chunks: list[int] = []
    second = None
    for step in range(400):
        if step == 3:
            (second,) = gen.insert([_prompt(300, 2)], max_tokens=[4])
        before = gen._counters.prompt_tokens
        prompt_rows, responses = gen.next()
        if second is not None and any(r.uid == second for r in prompt_rows):
            chunks.append(gen._counters.prompt_tokens - before)
        for r in responses:
            tokens.setdefault(r.uid, []).append(r.token)
        if second is not None and len(tokens.get(second, [])) >= 4 and step > 130:
            break
    return tokens, chunks, step


def test_a_prefill_budget_splits_a_long_arrival_between_decode_steps(model: Any) -> None:
    """While a row decodes, a long prompt is prefilled a few tokens a step (a fixed budget, or
    one learnt from the step times), not in prefill_step_size chunks; the tokens are the same."""
    plain, plain_chunks, _ = _budget_run(model, None)
    fixed, fixed_chunks, _ = _budget_run(model, 32)
    learnt, learnt_chunks, _ = _budget_run(model, 0)
    assert max(plain_chunks) == 128
    assert max(fixed_chunks) == 32 and len(fixed_chunks) >= 300 // 32
    assert max(learnt_chunks) <= 128 and len(learnt_chunks) > len(plain_chunks)
    assert fixed == plain
    assert learnt == plain


def test_one_forward_pass_gives_what_the_two_give(model: Any) -> None:
    """mixed.forward: the decode rows' logits and both groups' caches are those of a decode
    step and a prefill run apart (padded decode rows, a prompt continuing a cached prefix)."""
    import mlx.core as mx

    from appliance.engine.mlx_ext import mixed

    assert mixed.supports(model)
    decoding = [_prompt(30, 1), _prompt(50, 2), _prompt(41, 3)]

    def caches() -> tuple[list[Any], list[Any]]:
        dec = [_cache.BatchKVCache([50 - len(p) for p in decoding]) for _ in model.layers]
        model(mx.array([[0] * (50 - len(p)) + p for p in decoding]), cache=dec)
        chunk = [_cache.BatchKVCache([0]) for _ in model.layers]
        model(mx.array([_prompt(200, 9)]), cache=chunk)
        mx.eval([c.state for c in dec + chunk])
        return dec, chunk

    inputs, chunk = mx.array([[5], [6], [7]]), mx.array([_prompt(37, 11)])
    dec_a, chunk_a = caches()
    want = model(inputs, cache=dec_a)
    model(chunk, cache=chunk_a)
    dec_b, chunk_b = caches()
    got = mixed.forward(model, inputs, dec_b, chunk, chunk_b)
    mx.eval(want, got, [c.state for c in dec_a + chunk_a + dec_b + chunk_b])
    assert got.shape == want.shape == (3, 1, model.args.vocab_size)
    assert mx.allclose(got, want, atol=1e-4).item()
    for a, b in zip(dec_a + chunk_a, dec_b + chunk_b, strict=True):
        assert a._idx == b._idx
        assert mx.allclose(a.keys[..., : a._idx, :], b.keys[..., : b._idx, :], atol=1e-5).item()
        assert mx.allclose(a.values[..., : a._idx, :], b.values[..., : b._idx, :]).item()


def test_a_chunk_beside_decoding_rides_in_the_decode_step(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside a decoding row a lone prompt's chunks go through the decode step's forward pass
    (one pass a call), with the same tokens as two passes a call."""
    from appliance.engine.mlx_ext import mixed

    passes: list[tuple[int, ...]] = []
    plain = mixed.forward

    def counted(m: Any, inputs: Any, cache: Any, chunk: Any, chunk_cache: Any) -> Any:
        passes.append(tuple(chunk.shape))
        return plain(m, inputs, cache, chunk, chunk_cache)

    monkeypatch.setattr(mixed, "forward", counted)
    one, one_chunks, _ = _budget_run(model, 32)
    assert len(passes) == len(one_chunks) - 1  # all but the first, taken in the call it came
    assert all(p[0] == 1 and p[1] <= 32 for p in passes)
    passes.clear()
    two, two_chunks, _ = _budget_run(model, 32, mixed_prefill=False)
    assert not passes
    assert one == two and one_chunks == two_chunks


def test_prefill_budget_learns_from_step_times() -> None:
    b = batching.PrefillBudget(0, 512)
    assert b.per_row(1, decoding=False) == 512  # alone: whole chunks
    assert b.per_row(2, decoding=True) == b.START  # nothing measured yet: small
    b.decoded(0.004)
    b.prefilled(100, 0, 0.004 + 0.010, 0.004)  # 0.1 ms a token
    assert b.per_row(1, decoding=True) == 30  # 3/4 of a 4 ms step
    assert b.per_row(3, decoding=True) == 10
    assert batching.PrefillBudget(64, 512).per_row(2, decoding=True) == 32
    # a prefill that seemed free (noise) grows the budget twofold a step, not to a whole chunk
    c = batching.PrefillBudget(0, 512)
    assert c.per_row(1, decoding=True) == c.START
    c.decoded(0.004)
    c.prefilled(8, 0, 0.004, 0.004)
    assert [c.per_row(1, decoding=True) for _ in range(3)] == [16, 32, 64]
    assert batching.PrefillBudget(None, 512).per_row(2, decoding=True) == 512
    # one slow call (a kernel compiled the first time) counts as 4 of the learnt ones at most
    b.decoded(1.3)
    assert b.step_s == pytest.approx(0.004 + 0.2 * 0.012)
    b.prefilled(100, 0, 1.3, 0.004)
    assert b.token_s == pytest.approx(0.0001 + 0.2 * 0.0003)
    b.forget()  # after the warm-up: nothing learnt, start small
    assert b.step_s is None and b.token_s is None
    assert b.per_row(2, decoding=True) == b.START
    # fitted apart, a 4 ms step's 3/4 taken as 1 +- 1/4 of it in turn
    d = batching.PrefillBudget(0, 512)
    d.fixed_part = True
    assert d.per_row(2, decoding=True) == d.START
    d.decoded(0.004)
    d.prefilled(100, 0, 0.004 + 0.010, 0.004)
    assert sorted(d.per_row(1, decoding=True) for _ in range(2)) == [22, 38] and d.last == 30


@pytest.mark.parametrize(
    ("step_ms", "fixed_ms", "token_ms", "rows", "later"),
    [(2.7, 2.4, 0.35, 1, 0.0), (2.7, 2.4, 0.35, 3, 0.5), (5.6, 2.5, 0.034, 3, 0.8)],
)
def test_prefill_budget_separates_a_steps_fixed_cost(
    step_ms: float, fixed_ms: float, token_ms: float, rows: int, later: float
) -> None:
    """Every step that prefills pays a fixed part (the model's layers run once more) whatever
    its size. Fitted apart (`fixed_part`), the budget spends 3/4 of a decode step on tokens
    beyond it, even where a share `later` of a chunk's cost shows in the next step (a chunk
    launched, not waited for); charged to the tokens (the default), the budget shrinks to a
    token a row or close to it (the first two cases are the demo model's figures on two CPU
    cores, the last a 1B model's on a GPU)."""

    def run(fixed_part: bool) -> batching.PrefillBudget:
        b = batching.PrefillBudget(0, 2048)
        b.fixed_part = fixed_part
        b.decoded(step_ms / 1000)
        before = 0
        for _ in range(80):
            n = b.per_row(rows, decoding=True) * rows
            ms = step_ms + fixed_ms + token_ms * ((1 - later) * n + later * before)
            b.prefilled(n, before, ms / 1000, step_ms / 1000)
            before = n
        return b

    want = 0.75 * step_ms / token_ms
    fitted = run(True)
    assert 0.8 * want <= fitted.last <= 1.2 * want
    assert fitted.fixed_s * 1000 == pytest.approx(fixed_ms, rel=0.1)
    assert run(False).last < 0.5 * want
