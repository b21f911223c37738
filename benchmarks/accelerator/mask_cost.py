"""What the batched decode's attention mask and per-row positions cost (BENCHMARKS.md: on an H100
one row decoded solo took 2.3 ms a step, two rows in mlx-lm's batched path 5-6 ms).

    python3 -m benchmarks.accelerator.mask_cost MODEL_DIR [STEPS]

1. Attention alone, one query per row, the model's heads and head size, bf16, B rows x S keys:
   ms per call (each call evaluated) with no mask, the boolean mask mlx-lm's BatchKVCache makes,
   and the same mask made additive once.
2. mlx-lm's BatchGenerator at batch 2 / 8 / 64, same-length prompts (so no row is padded and every
   variant gives the same tokens), median ms a step over STEPS steps, variants interleaved:
   - as is: a boolean mask every step, per-row positions (an array) for RoPE
   - additive: the mask made additive once per step instead of once per layer inside attention
   - no mask: BatchKVCache.make_mask returns None (correct only because nothing is padded)
   - no mask, scalar position: as well, the cache's offset kept as a Python int after each update
   The gap between "as is" and the last is what an unmasked batched decode could save. The tokens
   compared are every row's in the 20 untimed steps before the timed ones.
"""

import sys

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import cache as C
from benchmarks.accelerator.steps import median_step_ms, per_call_ms

model, _ = load(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
a0 = model.layers[0].self_attn
HQ, HKV, D = a0.n_heads, a0.n_kv_heads, a0.head_dim
dtype = a0.o_proj.weight.dtype


print(f"attention alone ({HQ} query heads, {HKV} KV heads, head size {D}, {dtype}):", flush=True)
for b in (2, 8, 64):
    for s in (128, 512):
        q = mx.random.normal((b, HQ, 1, D)).astype(dtype)
        k = mx.random.normal((b, HKV, s, D)).astype(dtype)
        v = mx.random.normal((b, HKV, s, D)).astype(dtype)
        pad = mx.array([i % 7 for i in range(b)])
        boolean = mx.expand_dims(pad, (1, 2, 3)) <= mx.arange(s)[None]
        additive = mx.where(boolean, mx.array(0, dtype), mx.array(-mx.inf, dtype))
        mx.eval(q, k, v, boolean, additive)
        res = [per_call_ms(lambda m=m, q=q, k=k, v=v: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=D ** -0.5, mask=m)) for m in (None, boolean, additive)]
        print(f"  B={b:>2} S={s:>3}: no mask {res[0]:.3f} ms, boolean {res[1]:.3f}, additive {res[2]:.3f}",
              flush=True)

orig_mask = C.BatchKVCache.make_mask
orig_update = C.BatchKVCache.update_and_fetch


def additive_mask(self, N, return_array=False, **kw):
    m = orig_mask(self, N, return_array=return_array, **kw)
    if isinstance(m, mx.array) and m.dtype == mx.bool_:
        return mx.where(m, mx.array(0, dtype), mx.array(-mx.inf, dtype))
    return m


def no_mask(self, N, return_array=False, **kw):
    return None if N == 1 else orig_mask(self, N, return_array=return_array, **kw)


def scalar_update(self, keys, values):
    out = orig_update(self, keys, values)
    if keys.shape[2] == 1:  # decode: every row at the same position, since nothing is padded
        self.offset = self._idx
    return out


VARIANTS = {
    "as is": (orig_mask, orig_update),
    "additive": (additive_mask, orig_update),
    "no mask": (no_mask, orig_update),
    "no mask, scalar position": (no_mask, scalar_update),
}


def step_ms(b: int, variant: str) -> tuple[float, list[int]]:
    C.BatchKVCache.make_mask, C.BatchKVCache.update_and_fetch = VARIANTS[variant]
    try:
        toks: list[int] = []
        return median_step_ms(model, BatchGenerator, b, steps, warm_tokens=toks), toks
    finally:
        C.BatchKVCache.make_mask, C.BatchKVCache.update_and_fetch = orig_mask, orig_update


print(f"BatchGenerator step, median ms over {steps} steps:", flush=True)
for b in (2, 8, 64):
    for v in VARIANTS:
        step_ms(b, v)  # shapes compiled
    for rnd in range(2):
        res = {v: step_ms(b, v) for v in VARIANTS}
        ref = res["as is"][1]
        print(f"  batch {b:>2} round {rnd + 1}: " + ", ".join(
            f"{v} {ms:.2f}" + ("" if toks == ref else " (tokens differ)") for v, (ms, toks) in res.items()),
            flush=True)
