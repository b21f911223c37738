"""Where a single stream's decode step goes, and what it could be (docs/performance.md).

    python3 -m benchmarks.accelerator.step_cost MODEL_DIR [STEPS]

Llama-family models. For each variant, a pipelined greedy decode loop (the next step's graph is
built and launched before the previous token is read, as mlx-lm's generate_step does), and per
step: wall ms, ms building the graph in Python, ms in mx.async_eval (launching it), CPU ms of the
calling thread. Variants:

- plain:    mlx-lm's model and KVCache, as generate_step runs it
- fused:    the same with q/k/v and gate/up projections fused into one matmul each, as the
            appliance loads a model (appliance/engine/fusion.py)
- compiled: one mx.compile'd step over a fixed-size KV buffer (position as an array input, the
            attention masked past it), so the graph is traced once and replayed
- batchgen: mlx-lm's BatchGenerator at batch 1 and 64 (the bench's ceiling), stock and fused
- appliance: the appliance's BatchGenerator (appliance/engine/batching.py) at batch 1 and 64

The compiled variant's tokens are checked against plain's (same greedy tokens).
"""

import statistics
import sys
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from appliance.engine.mlx_ext import batching
from appliance.engine.mlx_ext.fusion import fuse_projections

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


def stats(name, walls, builds, calls, cpus):
    m = statistics.median
    print(
        f"{name:<22} step {m(walls):6.3f} ms (p90 {sorted(walls)[int(0.9 * len(walls))]:6.3f})"
        f"  build {m(builds):6.3f}  launch {m(calls):6.3f}  cpu {m(cpus):6.3f}"
        f"  -> {1000 / m(walls):7.1f} tokens/s",
        flush=True,
    )


def pipelined(name, step, first, n):
    walls, builds, calls, cpus, toks = [], [], [], [], []

    def go(y):
        t0 = time.perf_counter()
        nxt = step(y)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        builds.append(1000 * (t1 - t0))
        calls.append(1000 * (time.perf_counter() - t1))
        return nxt

    y = go(first)
    for _ in range(n + 30):
        t, c = time.perf_counter(), time.thread_time()
        nxt = go(y)
        toks.append(y.item())
        walls.append(1000 * (time.perf_counter() - t))
        cpus.append(1000 * (time.thread_time() - c))
        y = nxt
    k = slice(30, None)
    stats(name, walls[k], builds[k][1:], calls[k][1:], cpus[k])
    return toks


def plain(model, n, name="plain"):
    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.array([PROMPT]), cache=cache)[:, -1, :], axis=-1)
    mx.eval(y)

    def step(y: mx.array) -> mx.array:
        return mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)

    return pipelined(name, step, y, n)


def compiled(model, n, size=1024):
    inner = model.model
    a0 = model.layers[0].self_attn
    H, KV, hd = a0.n_heads, a0.n_kv_heads, a0.head_dim

    def step(tok, pos, *kv):
        h = inner.embed_tokens(tok[:, None])
        mask = (mx.arange(size) <= pos)[None, None, None, :]
        new = []
        for i, layer in enumerate(model.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).reshape(1, 1, H, hd).transpose(0, 2, 1, 3)
            k = a.k_proj(x).reshape(1, 1, KV, hd).transpose(0, 2, 1, 3)
            v = a.v_proj(x).reshape(1, 1, KV, hd).transpose(0, 2, 1, 3)
            q = a.rope(q, offset=pos)
            k = a.rope(k, offset=pos)
            kb = mx.slice_update(kv[2 * i], k, pos[None], axes=(2,))
            vb = mx.slice_update(kv[2 * i + 1], v, pos[None], axes=(2,))
            o = mx.fast.scaled_dot_product_attention(q, kb, vb, scale=a.scale, mask=mask)
            h = h + a.o_proj(o.transpose(0, 2, 1, 3).reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            new += [kb, vb]
        h = inner.norm(h)
        tied = model.args.tie_word_embeddings
        logits = inner.embed_tokens.as_linear(h) if tied else model.lm_head(h)
        return (mx.argmax(logits[:, -1, :], axis=-1), *new)

    cstep = mx.compile(step)
    dtype = model.layers[0].self_attn.o_proj.weight.dtype
    kv = [mx.zeros((1, KV, size, hd), dtype) for _ in range(2 * len(model.layers))]
    state = {"kv": kv, "pos": 0}
    mx.eval(state["kv"])

    def one(tok):
        out = cstep(tok, mx.array(state["pos"], mx.int32), *state["kv"])
        state["kv"] = list(out[1:])
        state["pos"] += 1
        return out[0]

    y = None
    for t in PROMPT:
        y = one(mx.array([t]))
    mx.eval(y)
    return pipelined("compiled", one, y, n)


def batchgen(model, name, b, n, cls=BatchGenerator):
    g = cls(
        model,
        stop_tokens=[[10**9]],
        completion_batch_size=64,
        prefill_batch_size=64,
        stream=mx.default_stream(mx.default_device()),
    )
    g.insert([PROMPT] * b, max_tokens=[n + 100] * b)
    for _ in range(30):
        g.next()
    walls, cpus = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.thread_time()
        g.next()
        walls.append(1000 * (time.perf_counter() - t))
        cpus.append(1000 * (time.thread_time() - c))
    g.close()
    m = statistics.median
    p90 = sorted(walls)[int(0.9 * len(walls))]
    print(
        f"{name + ' b' + str(b):<22} step {m(walls):6.3f} ms (p90 {p90:6.3f})"
        f"  cpu {m(cpus):6.3f}  -> {b * 1000 / m(walls):7.1f} tokens/s",
        flush=True,
    )


if __name__ == "__main__":
    model, _ = load(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    print(mx.__version__, mx.default_device(), flush=True)
    plain(model, 20)
    ref = plain(model, n)
    got = compiled(model, n)
    same = sum(a == b for a, b in zip(ref, got, strict=False))
    print(f"compiled tokens equal to plain's: {same} of {len(ref)}", flush=True)
    batchgen(model, "batchgen", 1, n)
    batchgen(model, "batchgen", 64, n)
    batchgen(model, "appliance", 1, n, batching.BatchGenerator)
    batchgen(model, "appliance", 64, n, batching.BatchGenerator)
    fuse_projections(model)  # appliance/engine/fusion.py, as the appliance loads a model
    fz = plain(model, n, "fused")
    same = sum(a == b for a, b in zip(ref, fz, strict=False))
    print(f"fused tokens equal to plain's: {same} of {len(ref)}", flush=True)
    batchgen(model, "batchgen fused", 1, n)
    batchgen(model, "batchgen fused", 64, n)
