"""CUDA workarounds (appliance/engine/mlx_ext/cuda.py): the unfused prefill attention used instead
of cuDNN's per-shape graphs (the same numbers as MLX's fused attention, checked here on the CPU
backend, and routing by size), the masked decode kernel's routing (here with the unfused
attention standing in for the kernel, which needs CUDA; its numbers are checked against MLX on a
card by benchmarks/accelerator/decode_attention.py and by the CUDA-only test below), and MLX's
cache-thrashing check turned off in the server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import pytest

from appliance.engine import memory
from appliance.engine.mlx_ext import cuda

pytestmark = pytest.mark.timeout(120)
_UNFUSED = cuda.unfused_attention  # the reference, also where a test stands something in for it


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    original = mx.fast.scaled_dot_product_attention
    yield
    mx.fast.scaled_dot_product_attention = original
    cuda._state.update(original=None, max_elements=0, decode_kernel=False)
    cuda._decode.pop("probe", None)
    memory.on_cuda.cache_clear()


def _qkv(b: int, hq: int, hk: int, lq: int, lk: int, dtype: Any = mx.float32) -> tuple[Any, ...]:
    mx.random.seed(7)
    return tuple(
        mx.random.normal(shape).astype(dtype)
        for shape in ((b, hq, lq, 64), (b, hk, lk, 64), (b, hk, lk, 64))
    )


@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2)])
@pytest.mark.parametrize(
    "lq,lk", [(5, 5), (3, 11)]
)  # a prompt alone; a chunk after a cached prefix
def test_unfused_attention_matches_the_fused_kernel(hq: int, hk: int, lq: int, lk: int) -> None:
    q, k, v = _qkv(3, hq, hk, lq, lk)
    causal_array = mx.arange(lk - lq, lk)[:, None] >= mx.arange(lk)[None]
    padded = mx.broadcast_to(causal_array, (3, 1, lq, lk)) & (mx.arange(lk) >= 1)  # left padding
    additive = mx.where(padded, 0.0, -1e9).astype(mx.float32)
    for mask in ("causal", causal_array, padded, additive, None):
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        got = cuda.unfused_attention(q, k, v, 0.125, mask)
        assert got.shape == want.shape
        assert mx.allclose(got, want, atol=1e-5, rtol=1e-4).item(), (
            mask if isinstance(mask, str) else mask.shape
        )


@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2)])
def test_long_attention_runs_in_pieces_with_the_same_result(hq: int, hk: int) -> None:
    lq, lk = 13, 29  # a chunk after a cached prefix, split into runs of 4, 4, 4 and 1 queries
    q, k, v = _qkv(2, hq, hk, lq, lk)
    causal_array = mx.arange(lk - lq, lk)[:, None] >= mx.arange(lk)[None]
    padded = mx.broadcast_to(causal_array, (2, 1, lq, lk)) & (mx.arange(lk) >= 3)
    keys_only = mx.broadcast_to(mx.arange(lk) >= 2, (2, 1, 1, lk))  # one row for every query
    additive = mx.where(padded, 0.0, -1e9).astype(mx.float32)
    block = 2 * hq * lk * 4
    pieces: list[int] = []
    inner = cuda._unfused

    def counted(q: Any, *a: Any) -> Any:
        pieces.append(q.shape[-2])
        return inner(q, *a)

    cuda._unfused = counted
    try:
        for mask in ("causal", causal_array, padded, keys_only, additive, None):
            want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
            pieces.clear()
            got = cuda.unfused_attention(q, k, v, 0.125, mask, block=block)
            assert pieces == [4, 4, 4, 1]
            assert got.shape == want.shape
            assert mx.allclose(got, want, atol=1e-5, rtol=1e-4).item(), (
                mask if isinstance(mask, str) else mask.shape
            )
    finally:
        cuda._unfused = inner


@pytest.mark.skipif(memory.on_cuda(), reason="asserts what happens off CUDA")
def test_only_cuda_is_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not cuda.install(1 << 27)  # this machine: the CPU backend
    assert cuda._state["original"] is None
    monkeypatch.setattr(cuda, "on_cuda", lambda: True)
    assert not cuda.install(0)  # 0: off


def test_small_prefills_go_unfused_and_the_rest_to_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    fused = mx.fast.scaled_dot_product_attention

    def spy(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        calls.append(tuple(q.shape))
        return fused(q, k, v, **kw)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(cuda, "on_cuda", lambda: True)
    assert cuda.install(2 * 8 * 16 * 16)
    assert cuda.install(2 * 8 * 16 * 16)  # twice: still one wrapper
    assert cuda._state["original"] is spy
    q, k, v = _qkv(2, 8, 2, 16, 16)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    assert calls == []  # at the limit: unfused
    assert mx.allclose(out, fused(q, k, v, scale=0.125, mask="causal"), atol=1e-5).item()
    q, k, v = _qkv(2, 8, 2, 16, 17)  # one key more: past the limit
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    q1, k1, v1 = _qkv(2, 8, 2, 1, 40)  # a decode step: MLX's vector kernel, never unfused
    mx.fast.scaled_dot_product_attention(q1, k1, v1, scale=0.125, mask=None)
    assert calls == [(2, 8, 16, 64), (2, 8, 1, 64)]


@pytest.mark.parametrize("name", ["MLX_ENABLE_CACHE_THRASHING_CHECK", "MLX_USE_CUDA_GRAPHS"])
@pytest.mark.parametrize("given,expected", [(None, "0"), ("1", "1")])
def test_the_server_sets_its_mlx_cuda_defaults_unless_told(
    name: str, given: Any, expected: str
) -> None:
    """Cache-thrashing errors and CUDA graphs off (see appliance/engine/mlx_ext/cuda.py)."""
    env = {k: v for k, v in os.environ.items() if k != name}
    if given is not None:
        env[name] = given  # an operator's own value wins
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, appliance.__main__, appliance.main as m; "
            f"print(os.environ.get({name!r}, '-')); m.prepare_process(); "
            f"print(os.environ[{name!r}])",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # Importing the entry point changes nothing; the process's preparation sets the defaults.
    assert out.stdout.split() == [given or "-", expected]


def _reference(q: Any, k: Any, v: Any, scale: float, mask: Any) -> Any:
    """The attention the kernel computes: in float32, rounded to q's type."""
    f32 = (x.astype(mx.float32) for x in (q, k, v))
    return _UNFUSED(*f32, scale, mask).astype(q.dtype)


def _kernel_stood_in_for(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Pretend to be on CUDA with the kernel replaced by `_reference`; returns the list of the
    query shapes it is called with."""
    calls: list[tuple[int, ...]] = []

    def stand_in(q: Any, k: Any, v: Any, scale: float, mask: Any, **_: Any) -> Any:
        calls.append(tuple(q.shape))
        return _reference(q, k, v, scale, mask)

    monkeypatch.setattr(cuda, "masked_decode_attention", stand_in)
    monkeypatch.setattr(cuda, "on_cuda", lambda: True)
    return calls


def _padding_mask(pads: list[int], n_keys: int) -> Any:
    """The boolean mask mlx-lm's BatchKVCache gives a decode step: row b sees keys from pads[b]
    on."""
    return mx.expand_dims(mx.array(pads), (1, 2, 3)) <= mx.arange(n_keys)


def test_the_decode_kernel_takes_what_a_padded_batch_gives_it() -> None:
    q, k, v = _qkv(3, 8, 2, 1, 11)
    mask = _padding_mask([0, 4, 10], 11)
    assert cuda.decode_kernel_fits(q, k, v, mask)
    assert cuda.decode_kernel_fits(q, k, v, mask[:1])  # one mask for every row
    assert not cuda.decode_kernel_fits(q, k, v, None)
    assert not cuda.decode_kernel_fits(q, k, v, mx.where(mask, 0.0, -1e9))  # additive: MLX's
    assert not cuda.decode_kernel_fits(
        q, k, v, _padding_mask([0, 4, 10], 12)
    )  # keys and mask disagree
    q2, k2, v2 = _qkv(3, 8, 2, 2, 11)
    assert not cuda.decode_kernel_fits(q2, k2, v2, mask)  # two queries: a prefill
    q3, k3, v3 = _qkv(3, 6, 4, 1, 11)
    assert not cuda.decode_kernel_fits(
        q3, k3, v3, mask
    )  # query heads not a multiple of the KV heads
    odd = [x[..., :48] for x in (q, k, v)]
    assert not cuda.decode_kernel_fits(*odd, mask)  # head size not 32, 64, 128 or 256
    per_head = mx.broadcast_to(mask, (3, 8, 1, 11))
    assert not cuda.decode_kernel_fits(q, k, v, per_head)  # a mask per query head: MLX's
    q4, k4, v4 = _qkv(3, 16, 1, 1, 11)
    assert not cuda.decode_kernel_fits(q4, k4, v4, mask)  # 16 query heads a KV head: too many
    assert cuda.decode_kernel_fits(*(x.astype(mx.bfloat16) for x in (q, k, v)), mask)
    assert not cuda.decode_kernel_fits(q, k.astype(mx.bfloat16), v, mask)  # mixed types
    assert not cuda.decode_kernel_fits(q, k, v, mask[:2])  # a mask for 2 rows, 3 rows
    assert not cuda.decode_kernel_fits(q, k[:2], v[:2], mask)  # keys for 2 rows, 3 queries
    assert not cuda.decode_kernel_fits(q, k, v[..., :5, :], mask)  # fewer values than keys


def test_padded_decode_steps_go_to_the_kernel_and_the_rest_to_mlx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel_calls = _kernel_stood_in_for(monkeypatch)
    fused = mx.fast.scaled_dot_product_attention
    assert not cuda.install(0, decode_kernel=False)  # both off: nothing to route
    assert cuda.install(0, decode_kernel=True)
    assert cuda.decode_kernel_in_force()
    kernel_calls.clear()  # install's check
    q, k, v = _qkv(3, 8, 2, 1, 11)
    mask = _padding_mask([0, 4, 10], 11)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert kernel_calls == [(3, 8, 1, 64)]
    assert mx.allclose(out, fused(q, k, v, scale=0.125, mask=mask), atol=1e-5).item()
    mx.fast.scaled_dot_product_attention(
        q, k, v, scale=0.125, mask=None
    )  # no padding: MLX's vector kernel
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mx.where(mask, 0.0, -1e9))
    assert len(kernel_calls) == 1
    assert cuda.install(1 << 20, decode_kernel=False)  # turned off again: MLX's path
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert len(kernel_calls) == 1


def test_a_short_chunk_of_one_row_goes_to_the_kernel_as_rows_of_one_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prompt prefilled a few tokens a step beside decoding streams: its chunk's L queries
    over the cached keys reach the kernel as L rows of one query, the keys and values shared
    (broadcast, not copied), each row its own line of the causal mask; the result is MLX's.
    Longer chunks, chunks of several rows and masks the kernel does not take stay MLX's."""
    monkeypatch.setattr(cuda, "_DECODE_CHUNK_QUERIES", 8)
    kernel_calls = _kernel_stood_in_for(monkeypatch)
    fused = mx.fast.scaled_dot_product_attention
    assert cuda.install(0, decode_kernel=True)
    kernel_calls.clear()
    q, k, v = _qkv(1, 8, 2, 5, 40)
    causal = mx.arange(35, 40)[:, None] >= mx.arange(40)[None]
    padded = mx.expand_dims(causal & (mx.arange(40) >= 3), (0, 1))  # a BatchKVCache's mask
    for mask in (padded, "causal"):
        got = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        want = fused(q, k, v, scale=0.125, mask=mask)
        assert got.shape == want.shape == (1, 8, 5, 64)
        tol = 2e-3 if memory.on_cuda() else 1e-5  # CUDA's float32 matmuls round as TF32 does
        assert mx.allclose(got, want, atol=tol).item(), mask if isinstance(mask, str) else "array"
    assert kernel_calls == [(5, 8, 1, 64)] * 2
    long_q = _qkv(1, 8, 2, cuda._DECODE_CHUNK_QUERIES + 1, 40)[0]
    two_rows = _qkv(2, 8, 2, 5, 40)
    mx.fast.scaled_dot_product_attention(long_q, k, v, scale=0.125, mask="causal")
    mx.fast.scaled_dot_product_attention(*two_rows, scale=0.125, mask="causal")
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mx.where(padded, 0.0, -1e9))
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=None)
    assert len(kernel_calls) == 2


def test_a_real_batch_of_padded_rows_decodes_through_the_kernel(
    demo_model_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlx-lm's model and BatchKVCache, prompts of different lengths: every decode step's attention
    reaches the kernel (so a change in how mlx-lm masks would show here, not as a silent slowdown
    on CUDA), and the tokens are those of MLX's own attention."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.utils import load

    model, _ = load(str(demo_model_dir))
    n_layers = len(model.layers)
    prompts = [[(i * 37 + j * 11) % 200 + 3 for j in range(n)] for i, n in enumerate((3, 9, 16))]

    def tokens() -> list[tuple[int, int]]:
        gen = BatchGenerator(
            model, stop_tokens=[[10**9]], completion_batch_size=8, prefill_batch_size=8
        )
        gen.insert(prompts, max_tokens=[12, 12, 12])
        out = []
        for _ in range(12):
            out += [(r.uid, r.token) for r in gen.next()[1]]
        gen.close()
        return out

    want = tokens()
    kernel_calls = _kernel_stood_in_for(monkeypatch)
    assert cuda.install(0, decode_kernel=True)
    kernel_calls.clear()  # install's check
    assert tokens() == want
    assert (
        len(kernel_calls) == 11 * n_layers
    )  # 12 tokens: the first from the prefill, 11 decode steps
    assert set(kernel_calls) == {
        (3, model.layers[0].self_attn.n_heads, 1, model.layers[0].self_attn.head_dim)
    }


def test_a_prompt_prefilled_beside_a_decoding_row_sends_its_chunks_to_the_kernel(
    demo_model_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The appliance's generator, a prompt arriving while a row decodes and prefilled 8 tokens a
    step in the decode step's forward pass: its chunks (up to _DECODE_CHUNK_QUERIES, here 8)
    reach the kernel as 8 rows of one query, and every token is the one MLX's own attention
    gives."""
    from mlx_lm.utils import load

    from appliance.engine.mlx_ext import batching

    model, _ = load(str(demo_model_dir))
    attn = model.layers[0].self_attn

    def tokens() -> list[tuple[int, int]]:
        gen = batching.BatchGenerator(
            model,
            stop_tokens=[[10**9]],
            completion_batch_size=8,
            prefill_batch_size=8,
            prefill_step_size=64,
            prefill_budget=8,
        )
        out = []
        gen.insert([[5, 9, 13, 17]], max_tokens=[30])
        for step in range(30):
            if step == 2:
                gen.insert([[(j * 13) % 200 + 3 for j in range(60)]], max_tokens=[4])
            out += [(r.uid, r.token) for r in gen.next()[1]]
        gen.close()
        return out

    want = tokens()
    monkeypatch.setattr(cuda, "_DECODE_CHUNK_QUERIES", 8)
    kernel_calls = _kernel_stood_in_for(monkeypatch)
    assert cuda.install(0, decode_kernel=True)
    kernel_calls.clear()  # install's check
    assert tokens() == want
    assert (8, attn.n_heads, 1, attn.head_dim) in kernel_calls


@pytest.mark.parametrize("fault", ["raises", "wrong"])
def test_a_decode_kernel_that_fails_its_check_stays_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """A kernel that cannot be compiled (no CUDA headers for MLX's JIT, say) or that computes
    something else (an MLX whose custom kernels behave otherwise) is checked once at install,
    left off with a warning that says why, and MLX's attention serves the decode steps."""

    def broken(q: Any, k: Any, v: Any, scale: float, mask: Any, **_: Any) -> Any:
        if fault == "raises":
            raise RuntimeError("Failed to compile kernel: cuda_fp16.h: No such file")
        return mx.zeros(q.shape, q.dtype)

    monkeypatch.setattr(cuda, "masked_decode_attention", broken)
    monkeypatch.setattr(cuda, "on_cuda", lambda: True)
    with caplog.at_level("WARNING", logger="appliance.engine.cuda"):
        assert not cuda.install(0, decode_kernel=True)
    assert not cuda.decode_kernel_in_force()
    (record,) = [r for r in caplog.records if "decode attention kernel is off" in r.getMessage()]
    assert (
        "Failed to compile kernel" if fault == "raises" else "differs from MLX"
    ) in record.getMessage()
    assert cuda.install(1 << 20, decode_kernel=True)  # prefill routing still in force; checked once
    assert not cuda.decode_kernel_in_force()
    q, k, v = _qkv(3, 8, 2, 1, 11)
    mask = _padding_mask([0, 4, 10], 11)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert mx.allclose(out, cuda._state["original"](q, k, v, scale=0.125, mask=mask)).item()


def test_turning_both_off_gives_mlx_back_its_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cuda, "unfused_attention", lambda *a: calls.append("unfused"))
    monkeypatch.setattr(
        cuda,
        "masked_decode_attention",
        lambda *a, **_: calls.append("kernel") or _reference(*a),
    )
    monkeypatch.setattr(cuda, "on_cuda", lambda: True)
    assert cuda.install(1 << 20, decode_kernel=True)
    assert cuda.decode_kernel_in_force()
    assert not cuda.install(0, decode_kernel=False)  # the last call's settings win
    assert not cuda.decode_kernel_in_force()
    calls.clear()  # install's check
    q, k, v = _qkv(2, 8, 2, 4, 4)
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    q, k, v = _qkv(3, 8, 2, 1, 11)
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=_padding_mask([0, 4, 10], 11))
    assert calls == []


@pytest.mark.parametrize(
    "hq,hkv,d,n_keys,heads,warps",
    [
        (32, 8, 64, 11, 4, 8),
        (16, 2, 256, 11, 8, 4),
        (8, 8, 128, 11, 1, 8),
        (32, 8, 64, 1024, 1, 8),  # 3 rows x 8 KV heads over 1,024 keys: a block per query head
    ],
)
def test_the_kernel_is_launched_one_block_per_row_and_kv_head(
    monkeypatch: pytest.MonkeyPatch, hq: int, hkv: int, d: int, n_keys: int, heads: int, warps: int
) -> None:
    """What masked_decode_attention hands MLX (mx.fast.cuda_kernel stood in for, as it needs
    CUDA): its inputs in order, the block and grid, the template, the output's shape; the kernel
    built once and the scale kept. A block serves the query heads of one KV head, or one query head
    where few rows attend to many keys."""
    made: list[dict[str, Any]] = []
    launches: list[dict[str, Any]] = []

    def fake_cuda_kernel(**spec: Any) -> Any:
        made.append(spec)

        def launch(**kw: Any) -> list[Any]:
            launches.append(kw)
            return [mx.zeros(kw["output_shapes"][0], dtype=kw["output_dtypes"][0])]

        return launch

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    monkeypatch.setitem(cuda._decode, "kernels", {})
    monkeypatch.setitem(cuda._decode, "scales", {})
    monkeypatch.setattr(cuda, "_DECODE_SPLITS", 1)  # the keys whole
    q = mx.zeros((3, hq, 1, d), mx.bfloat16)
    k = mx.zeros((3, hkv, n_keys, d), mx.bfloat16)
    v = mx.zeros((3, hkv, n_keys, d), mx.bfloat16)
    mask = _padding_mask([0, 4, 10], n_keys)
    assert cuda.decode_kernel_fits(q, k, v, mask)
    for _ in range(2):
        out = cuda.masked_decode_attention(q, k, v, 0.125, mask)
        assert out.shape == (3, hq, 1, d) and out.dtype == mx.bfloat16
    assert len(made) == 1 and made[0]["input_names"] == ["q", "k", "v", "mask", "scale"]
    assert made[0]["ensure_row_contiguous"] is False  # the cache's views, not copies
    first, second = launches
    assert all(a is b for a, b in zip(first["inputs"][:4], (q, k, v, mask), strict=True))
    assert first["inputs"][4].item() == 0.125
    assert second["inputs"][4] is first["inputs"][4]
    assert first["threadgroup"] == (32 * warps, 1, 1)
    assert first["grid"] == (
        32 * warps * hq // heads,
        3,
        1,
    )  # threads in all: a block per (heads, row)
    assert dict(first["template"]) == {
        "T": mx.bfloat16,
        "D": d,
        "G": heads,
        "WARPS": warps,
        "UNROLL": cuda._DECODE_UNROLL,
    }
    assert first["output_shapes"] == [(3, hq, 1, d)] and first["output_dtypes"] == [mx.bfloat16]


def _fake_kernels(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], list[Any]]:
    """mx.fast.cuda_kernel stood in for (it needs CUDA): the kernels made and their launches,
    each launch giving zeros of its output shapes."""
    made: list[dict[str, Any]] = []
    launches: list[dict[str, Any]] = []

    def fake_cuda_kernel(**spec: Any) -> Any:
        made.append(spec)

        def launch(**kw: Any) -> list[Any]:
            launches.append(dict(kw, name=spec["name"]))
            return [
                mx.zeros(shape, dtype=dtype)
                for shape, dtype in zip(kw["output_shapes"], kw["output_dtypes"], strict=True)
            ]

        return launch

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    monkeypatch.setitem(cuda._decode, "kernels", {})
    monkeypatch.setitem(cuda._decode, "scales", {})
    return made, launches


@pytest.mark.parametrize(
    "b,n_keys,splits",
    [
        (3, 2048, 3),  # 96 (row, query head) pairs over 2,048 keys: runs for 64 blocks
        (3, 16384, 16),  # runs of about 1,024 keys
        (1, 16384, 16),
        (1, 1024, 4),  # at least 64 blocks, runs of 256 keys or more
        (8, 8192, 8),
        (8, 2048, 1),  # 256 pairs over few keys: whole
        (32, 8192, 1),  # 256 blocks already: whole
        (3, 500, 1),  # too few keys to split
    ],
)
def test_few_rows_over_long_keys_split_the_keys_into_runs(
    monkeypatch: pytest.MonkeyPatch, b: int, n_keys: int, splits: int
) -> None:
    """Where few blocks would each walk many keys, the keys are split into runs across the
    grid's z, a block per KV head: a kernel writes each run's softmax state in float32 (its
    values, and its max and sum), and a second one merges them into the result, a block of
    head-size threads for each row and query head. Both are made once."""
    made, launches = _fake_kernels(monkeypatch)
    q = mx.zeros((b, 32, 1, 64), mx.bfloat16)
    k = mx.zeros((b, 8, n_keys, 64), mx.bfloat16)
    mask = _padding_mask([i for i in range(b)], n_keys)
    for _ in range(2):
        out = cuda.masked_decode_attention(q, k, k, 0.125, mask)
        assert out.shape == (b, 32, 1, 64) and out.dtype == mx.bfloat16
    if splits == 1:
        assert [m["name"] for m in made] == ["appliance_decode_attention_final"]
        assert [launch["grid"][2] for launch in launches] == [1, 1]
        return
    assert [m["name"] for m in made] == [
        "appliance_decode_attention_partial",
        "appliance_decode_attention_merge",
    ]
    assert made[0]["output_names"] == ["part_o", "part_ml"]
    assert made[1]["input_names"] == ["part_o", "part_ml"]
    runs, merge = launches[:2]
    assert runs["grid"] == (32 * 8 * 8, b, splits) and runs["threadgroup"] == (256, 1, 1)
    assert dict(runs["template"])["G"] == 4
    assert runs["output_shapes"] == [(b, 32, splits, 64), (b, 32, splits, 2)]
    assert runs["output_dtypes"] == [mx.float32, mx.float32]
    assert merge["grid"] == (64, b * 32, 1) and merge["threadgroup"] == (64, 1, 1)
    assert merge["template"] == [("T", mx.bfloat16)]
    assert merge["output_shapes"] == [(b, 32, 1, 64)] and merge["output_dtypes"] == [mx.bfloat16]


def test_the_warm_up_builds_the_layouts_long_contexts_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLX compiles a custom kernel in every process the first time a template is launched. After
    a warm-up of short padded rows (a block per KV head, the keys whole), build_decode_layouts
    launches, once, the templates a few rows over many keys take (a block per query head, or the
    keys split into runs and merged), for the heads it has seen; the kernel itself stood in for,
    as it needs CUDA."""
    _, launches = _fake_kernels(monkeypatch)
    monkeypatch.setitem(cuda._decode, "seen", set())
    monkeypatch.setitem(cuda._decode, "built", set())

    def launched() -> list[tuple[str, Any, Any]]:
        return [
            (str(x["name"]).rsplit("_", 1)[1], dict(x["template"]).get("G"), x["grid"][2])
            for x in launches
        ]

    q = mx.zeros((2, 32, 1, 64), mx.bfloat16)
    k = mx.zeros((2, 8, 11, 64), mx.bfloat16)
    cuda.masked_decode_attention(q, k, k, 0.125, _padding_mask([0, 3], 11))  # the warm-up's
    assert launched() == [("final", 4, 1)]
    assert cuda.build_decode_layouts() == 2
    assert launched()[1:] == [("final", 1, 1), ("partial", 4, 2), ("merge", None, 1)]
    assert all(dict(x["template"])["T"] == mx.bfloat16 for x in launches)
    assert cuda.build_decode_layouts() == 0  # built once
    for n_keys in (1024, 16384):  # what serving then takes: built already
        long_k = mx.zeros((2, 8, n_keys, 64), mx.bfloat16)
        cuda.masked_decode_attention(q, long_k, long_k, 0.125, _padding_mask([0, 3], n_keys))
    assert launched()[-4:] == [
        ("partial", 4, 4),
        ("merge", None, 1),
        ("partial", 4, 16),
        ("merge", None, 1),
    ]
    assert cuda.build_decode_layouts() == 0


@pytest.mark.skipif(not memory.on_cuda(), reason="the kernel runs on CUDA only")
@pytest.mark.parametrize(
    "grouped", [True, False], ids=["a-block-per-kv-head", "a-block-per-query-head"]
)
@pytest.mark.parametrize("splits", [0, 3], ids=["keys-whole", "keys-in-runs"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_the_decode_kernel_matches_mlx_on_cuda(
    dtype: Any, grouped: bool, splits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against MLX's attention in float32 on the same inputs, the kernel is off by at most its
    output's rounding to `dtype` (it computes in float32): head sizes 32-256, 1-8 query heads a KV
    head, one mask for all rows or one per row, rows from unpadded to one key, q a transposed view
    and k, v views into longer buffers as a decode step has them, and k, v read with a key stride
    (the unpacked loads). Both block layouts, whatever the batch size would choose, and the keys
    whole or split into runs (some empty, where there are few keys)."""
    monkeypatch.setattr(cuda, "_DECODE_LAYOUT", "grouped" if grouped else "per-head")
    monkeypatch.setattr(cuda, "_DECODE_SPLITS", splits or 1)
    cases = (
        (1, 32, 8, 7, 64),
        (3, 32, 8, 5000, 64),
        (8, 32, 8, 130, 128),
        (5, 16, 2, 513, 256),
        (3, 4, 4, 40, 32),
        (6, 8, 4, 100, 64),
    )
    for b, hq, hkv, n_keys, d in cases:
        for layout in ("cache", "transposed"):
            mx.random.seed(b + n_keys)
            q = mx.random.normal((b, 1, hq, d)).astype(dtype).transpose(0, 2, 1, 3)
            if layout == "cache":
                k, v = (
                    mx.random.normal((b, hkv, n_keys + 9, d)).astype(dtype)[:, :, :n_keys]
                    for _ in "kv"
                )
            else:  # elements n_keys apart, keys next to each other: no 16-byte loads
                k, v = (
                    mx.random.normal((b, hkv, d, n_keys)).astype(dtype).swapaxes(2, 3) for _ in "kv"
                )
            pads = [i * (n_keys - 1) // max(1, b - 1) for i in range(b)]
            for mask in (_padding_mask(pads, n_keys), _padding_mask([n_keys // 3], n_keys)):
                assert cuda.decode_kernel_fits(q, k, v, mask)
                want = mx.fast.scaled_dot_product_attention(
                    *(x.astype(mx.float32) for x in (q, k, v)), scale=d**-0.5, mask=mask
                )
                got = cuda.masked_decode_attention(q, k, v, d**-0.5, mask).astype(mx.float32)
                tol = 1e-5 if dtype == mx.float32 else 2.0**-7 if dtype == mx.bfloat16 else 2.0**-10
                assert mx.allclose(got, want, rtol=tol, atol=1e-4).item(), (
                    b,
                    hq,
                    hkv,
                    n_keys,
                    d,
                    layout,
                    mask.shape,
                    mx.max(mx.abs(got - want)).item(),
                )


@pytest.mark.skipif(not memory.on_cuda(), reason="the kernel runs on CUDA only")
@pytest.mark.parametrize("length", [2, 7, 16])
def test_a_short_chunk_through_the_kernel_matches_mlx_on_cuda(length: int) -> None:
    """A chunk of a few queries after a long cached prefix, as rows of one query through the
    kernel (keys split into runs), against MLX's attention in float32: off by at most bf16's
    rounding."""
    assert cuda.install(0, decode_kernel=True)
    mx.random.seed(length)
    q = mx.random.normal((1, length, 32, 64)).astype(mx.bfloat16).transpose(0, 2, 1, 3)
    k, v = (mx.random.normal((1, 8, 5000, 64)).astype(mx.bfloat16)[:, :, :4990] for _ in "kv")
    causal = mx.arange(4990 - length, 4990)[:, None] >= mx.arange(4990)[None]
    mask = mx.expand_dims(causal & (mx.arange(4990) >= 20), (0, 1))
    got = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    want = cuda._state["original"](
        *(x.astype(mx.float32) for x in (q, k, v)), scale=0.125, mask=mask
    )
    assert got.shape == (1, 32, length, 64)
    off = mx.max(mx.abs(got.astype(mx.float32) - want)).item()
    assert off <= 2.0**-6, off


@pytest.mark.parametrize("cuda_here", [True, False])
def test_the_warm_up_reaches_long_contexts_on_cuda_only(
    demo_model_dir: Any, monkeypatch: pytest.MonkeyPatch, cuda_here: bool
) -> None:
    """On CUDA, MLX's attention for a lone row (no mask) goes through cuDNN over 256 keys or
    more, and through its two-pass kernel past 1,024 with cuDNN off. The warm-up there also runs
    a lone prompt longer than both, so their first use falls before the model counts as loaded;
    elsewhere the warm-up stays short (a large model on a CPU or a Mac would pay seconds)."""
    import asyncio

    from mlx_lm import load

    from appliance.config import ModelSpec
    from appliance.engine import worker

    lengths: list[list[int]] = []
    real = worker._run_to_end

    def recording(gen: Any, prompts: list[list[int]], max_tokens: list[int], **kw: Any) -> Any:
        lengths.append([len(p) for p in prompts])
        return real(gen, prompts, max_tokens, **kw)

    monkeypatch.setattr(worker, "_run_to_end", recording)
    monkeypatch.setattr(worker, "on_cuda", lambda: cuda_here)

    async def go() -> None:
        w = worker.ModelWorker(
            "demo",
            "builtin:demo",
            loader=lambda: tuple(load(str(demo_model_dir))[:2]),
            loop=asyncio.get_running_loop(),
            prompt_cache_bytes=0,
            **worker.batching(ModelSpec()),
        )
        await w.start()
        w.stop()
        await asyncio.to_thread(w.join, 10.0)

    asyncio.run(go())
    longest = max(n for call in lengths for n in call)
    assert (longest > 1024) is cuda_here, lengths
