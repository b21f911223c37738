"""SmolLM2 (Q4_1 GGUF) through the GGUF loader: load time, prefill and decode speed.

    python benchmarks/gguf_cpu.py [--prompt-tokens 120] [--decode-tokens 64] [--repeat 3]

Measures a first load (conversion into a fresh cache folder), a cached load, then prefill
tokens/s on one prompt and decode tokens/s, with the weights as stored (quantized) and
dequantized to dense float32. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import mlx.core as mx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, default=120)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dtype", default=None, help="float32 | float16 | bfloat16 (default: by device)"
    )
    args = parser.parse_args()

    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import dequantize_model

    from appliance.engine.builtin import fetch_smollm2
    from appliance.engine.gguf import load

    dtype = getattr(mx, args.dtype) if args.dtype else None
    path = fetch_smollm2(progress=lambda _m: None)
    result: dict = {
        "device": str(mx.default_device()),
        "machine": platform.machine(),
        "dtype": args.dtype or "auto",
    }
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        model, tok = load(path, cache_dir=cache, dtype=dtype)
        result["first_load_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        model, tok = load(path, cache_dir=cache, dtype=dtype)
        result["cached_load_s"] = round(time.perf_counter() - t, 3)

    text = (
        "The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, sold and read across Europe. "
    ) * 8
    prompt = tok.encode(text, add_special_tokens=False)[: args.prompt_tokens]
    result["prompt_tokens"] = len(prompt)

    def measure(m) -> dict:
        prefill, decode = [], []
        for _ in range(args.repeat):
            cache = make_prompt_cache(m)
            t = time.perf_counter()
            mx.eval(m(mx.array([prompt]), cache=cache))
            prefill.append(len(prompt) / (time.perf_counter() - t))
            steps = generate_step(
                mx.array(prompt),
                m,
                max_tokens=args.decode_tokens + 1,
                sampler=lambda x: mx.argmax(x, axis=-1),
            )
            next(steps)  # prefill and first token
            t = time.perf_counter()
            n = sum(1 for _ in steps)
            decode.append(n / (time.perf_counter() - t))
        return {"prefill_tok_s": round(max(prefill), 1), "decode_tok_s": round(max(decode), 1)}

    result["quantized"] = measure(model)
    dense = dequantize_model(model)
    dense.set_dtype(dtype or mx.float32)
    mx.eval(dense.parameters())
    result["dense_float32" if dtype in (None, mx.float32) else f"dense_{args.dtype}"] = measure(
        dense
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
