"""What `kv_bits` costs and saves: bytes per cached token at full precision, 8 and 4 bits, and
how often greedy decoding after a quantized cached prefix picks the same tokens as after the
full-precision one. Run by hand:

    python -m benchmarks.kv_bits [--models demo smollm2] [--prompts 10] [--tokens 32]

Each prompt (a chat-templated question) is prefilled but for its last token; that cache, as is
and quantized then dequantized as the prompt cache hands it out, continues greedily for
`--tokens` tokens. Agreement: positions with the same token, and the tokens before the first
difference, summed over the prompts.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import say

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Name three primary colors.",
    "What is a prime number?",
    "Give me a tip for learning a new language.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "What does a compiler do?",
    "How many legs does a spider have?",
]
PATHS = {"demo": "builtin:demo", "smollm2": "builtin:smollm2"}


def _load(name: str) -> tuple[Any, Any]:
    from appliance.config.schema import ModelSpec
    from appliance.engine.loading import load_model
    from appliance.engine.paths import resolve_path

    path = resolve_path(ModelSpec(path=PATHS.get(name, name)), None)
    return load_model(name, path, builtin_dir=None)


def _prefill(model: Any, tokens: list[int]) -> list[Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def _greedy(model: Any, last: int, cache: list[Any], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array([last]), model, prompt_cache=cache, max_tokens=n, sampler=lambda x: x.argmax(-1)
    )
    return [int(t) for t, _ in steps]


def measure(name: str, prompts: int, tokens: int) -> dict[str, Any]:
    from appliance.engine.disk_cache import compact
    from appliance.engine.mlx_ext.prompt_cache import dequantize, quantize

    say(f"loading {name}")
    model, tok = _load(name)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in (QUESTIONS * 2)[:prompts]
    ]
    out: dict[str, Any] = {"model": name}
    full = compact(_prefill(model, list(texts[0])[:-1]))
    assert full is not None
    n = full[0].offset
    out["dtype"] = str(full[0].keys.dtype).replace("mlx.core.", "")
    out["bytes_per_token"] = {"full": sum(c.nbytes for c in full) / n}
    for bits in (8, 4):
        out["bytes_per_token"][str(bits)] = sum(c.nbytes for c in quantize(full, bits)) / n
    agree: dict[str, dict[str, int]] = {"8": {}, "4": {}}
    for prompt in texts:
        prompt = list(prompt)
        base = _greedy(model, prompt[-1], _prefill(model, prompt[:-1]), tokens)
        for bits in (8, 4):
            cache = dequantize(quantize(compact(_prefill(model, prompt[:-1])) or [], bits))
            got = _greedy(model, prompt[-1], cache, tokens)
            pairs = list(zip(base, got, strict=False))
            same = sum(x == y for x, y in pairs)
            first = next((i for i, (x, y) in enumerate(pairs) if x != y), len(pairs))
            tally = agree[str(bits)]
            tally["same"] = tally.get("same", 0) + same
            tally["before_first_difference"] = tally.get("before_first_difference", 0) + first
            tally["tokens"] = tally.get("tokens", 0) + len(base)
            tally["identical_answers"] = tally.get("identical_answers", 0) + int(got == base)
        say(f"{name}: prompt of {len(prompt)} tokens done")
    out["agreement"] = agree
    out["prompts"] = len(texts)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["demo", "smollm2"])
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    for name in args.models:
        print(json.dumps(measure(name, args.prompts, args.tokens)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
