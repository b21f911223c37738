"""What grammar-constrained sampling costs: the per-token mask (consume the sampled token, compute
the allowed-token bitmask, apply it to the logits) and the decode speed of unconstrained streams
with and without constrained neighbours in one batch.

    python benchmarks/constraints_cost.py [--tokenizer PATH] [--steps 200] [--streams 4]

Models: the demo model (1024 tokens), and the demo's shape with a 49152-token vocabulary
(SmolLM2's tokenizer from PATH: a folder with tokenizer.json or a .gguf file; else the first
`smollm2*` in the appliance's model cache; else a synthetic 49152-token byte-level BPE).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
        "required": ["id", "name"],
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "days": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "t": {"type": "number", "minimum": -40, "maximum": 50},
                        "sky": {"enum": ["sun", "rain", "snow", "fog"]},
                    },
                    "required": ["t", "sky"],
                },
                "minItems": 2,
                "maxItems": 5,
            },
        },
        "required": ["city", "days"],
    },
    {
        "type": "object",
        "properties": {
            "email": {"type": "string", "format": "email"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        },
        "required": ["email", "code", "tags"],
    },
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- tokenizers


def tokenizer_from_gguf(path: Path) -> Any:
    """A fast Hugging Face tokenizer from a GGUF file's byte-level BPE (gpt2 model)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    f = GGUFReader(str(path)).fields
    if str(f["tokenizer.ggml.model"].contents()) != "gpt2":
        raise SystemExit(f"{path}: only byte-level BPE (gpt2) GGUF tokenizers are read here")
    tokens = [str(t) for t in f["tokenizer.ggml.tokens"].contents()]
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == 3
        ]
    )
    eos = tokens[int(f["tokenizer.ggml.eos_token_id"].contents())]
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos)


def synthetic_tokenizer(n: int = 49152, seed: int = 0) -> Any:
    """A byte-level BPE of exactly `n` tokens, merges drawn at random (no training)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    common = [c for c in base if c.isalnum() or c in 'Ġ"{}:,[]._-']
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(base)}}
    merges: list[tuple[str, str]] = []
    pieces = list(base)
    while len(vocab) < n:
        a = rng.choice(pieces if rng.random() < 0.5 else common)
        b = rng.choice(common)
        if a + b in vocab or len(a + b) > 12:
            continue
        vocab[a + b] = len(vocab)
        merges.append((a, b))
        pieces.append(a + b)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def big_tokenizer(arg: Optional[str]) -> tuple[Any, str]:
    """(HF tokenizer, what it is) for the 49k-vocabulary runs."""
    from transformers import PreTrainedTokenizerFast

    candidates: list[Path] = [Path(arg)] if arg else []
    if not arg:
        import platformdirs

        cache = Path(platformdirs.user_cache_path("appliance")) / "models"
        candidates = sorted(cache.glob("smollm2*"))
    for p in candidates:
        if p.is_dir():
            for g in sorted(p.glob("*.gguf")):
                return tokenizer_from_gguf(g), f"SmolLM2 ({g.name})"
            if (p / "tokenizer.json").is_file():
                return PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json")), str(p)
        elif p.suffix == ".gguf":
            return tokenizer_from_gguf(p), f"SmolLM2 ({p.name})"
    if arg:
        raise SystemExit(f"no tokenizer at {arg}")
    return synthetic_tokenizer(), "synthetic 49152-token BPE"


def wrap(hf: Any) -> Any:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(hf, eos_token_ids=[hf.eos_token_id])


def demo_shaped_model(vocab: int, seed: int = 7) -> Any:
    """The demo's Llama shape with another vocabulary, random weights."""
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=384,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


# -- the mask alone


def mask_cost(tokenizer: Any, vocab: int, tokens_per_schema: int = 400) -> dict[str, float]:
    """Per-token mask cost with random logits (no model): llguidance (consume + bitmask) and the
    whole processor call (that, plus unpacking and applying the mask, evaluated)."""
    import mlx.core as mx

    from appliance.engine import constraints as C

    bridge = C.TokenizerBridge.for_tokenizer(tokenizer, vocab_size=vocab)
    key = mx.random.key(0)
    call_s: list[float] = []
    base_s: list[float] = []
    for schema in SCHEMAS:
        n = 0
        while n < tokens_per_schema:
            proc = C.GrammarProcessor(
                C.Constraint(C.json_schema(schema, strict=True)), bridge, overlap=False
            )
            context = [1]
            for _ in range(256):
                key, sub = mx.random.split(key)
                logits = mx.random.normal((1, vocab), key=sub)
                toks = mx.array(context)
                mx.eval(logits, toks)
                t0 = time.perf_counter()
                out = proc(toks, logits)
                token: Any = mx.argmax(out, axis=-1).item()
                call_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                mx.argmax(logits, axis=-1).item()  # what the same step costs unmasked
                base_s.append(time.perf_counter() - t0)
                n += 1
                if token in tokenizer.eos_token_ids or proc.error:
                    break
                context.append(int(token))
    call_s.sort()
    extra = [max(0.0, c - b) for c, b in zip(call_s, sorted(base_s), strict=True)]
    return {
        "tokens": len(call_s),
        "mask_apply_ms_mean": 1e3 * statistics.fmean(extra),
        "mask_apply_ms_p50": 1e3 * extra[len(extra) // 2],
        "mask_apply_ms_p99": 1e3 * extra[int(len(extra) * 0.99)],
    }


# -- decode speed in a batch


def decode_speed(
    model: Any,
    tokenizer: Any,
    *,
    streams: int,
    neighbours: str,
    steps: int,
    overlap: bool,
    fast: bool,
) -> dict[str, float]:
    """Tokens/s of `streams` unconstrained rows over `steps` steps, beside `streams`
    neighbours: none, unconstrained, or constrained (each re-inserted as it ends)."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from appliance.engine import constraints as C
    from appliance.engine.mlx_ext import batching

    cls = batching.BatchGenerator if fast else BatchGenerator
    gen = cls(
        model,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        completion_batch_size=2 * streams,
        prefill_batch_size=2 * streams,
    )
    bridge = C.TokenizerBridge.for_tokenizer(tokenizer, vocab_size=model.args.vocab_size)
    grammars = [C.json_schema(s, strict=True) for s in SCHEMAS]
    prompt = tokenizer.encode("Give the answer as JSON: the weather in Paris")
    main = set(gen.insert([prompt] * streams, max_tokens=[10**6] * streams))
    procs: dict[int, Any] = {}
    counter = [0]

    def add_neighbour() -> None:
        if neighbours == "none":
            return
        lp: list[Any] = []
        if neighbours == "constrained":
            g = grammars[counter[0] % len(grammars)]
            lp = [C.GrammarProcessor(C.Constraint(g), bridge, overlap=overlap)]
        counter[0] += 1
        (uid,) = gen.insert([prompt], max_tokens=[96], logits_processors=[lp])
        if lp:
            procs[uid] = lp[0]

    for _ in range(streams):
        add_neighbour()
    # warm up: prefill and the first steps
    for _ in range(8):
        gen.next()
    produced = 0
    mask_s = 0.0
    masked = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        _, responses = gen.next()
        for r in responses:
            if r.uid in main:
                produced += 1
            elif r.finish_reason is not None:
                p = procs.pop(r.uid, None)
                if p is not None:
                    mask_s += p.mask_s
                    masked += p.steps
                add_neighbour()
    elapsed = time.perf_counter() - t0
    for p in procs.values():
        mask_s += p.mask_s
        masked += p.steps
    mx.synchronize()
    gen.close()
    return {
        "unconstrained_tok_s": produced / elapsed,
        "step_ms": 1e3 * elapsed / steps,
        "constrained_rows_ended": counter[0] - streams if neighbours != "none" else 0,
        "mask_ms_per_token": (1e3 * mask_s / masked) if masked else 0.0,
    }


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", help="SmolLM2's tokenizer: a folder or a .gguf file")
    ap.add_argument("--steps", type=int, default=200, help="decode steps per measurement")
    ap.add_argument("--streams", type=int, default=4, help="unconstrained streams")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (the median is kept)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from mlx_lm import load

    from appliance.engine import constraints as C
    from appliance.engine.demo import ensure_demo_model

    results: dict[str, Any] = {}
    log("loading the demo model")
    loaded: Any = load(str(ensure_demo_model(None, progress=log)))
    demo_model, demo_tok = loaded[0], loaded[1]
    log("reading the 49k tokenizer")
    big_hf, big_name = big_tokenizer(args.tokenizer)
    big_tok = wrap(big_hf)
    big_model = demo_shaped_model(len(big_hf))

    models: list[tuple[str, Any, Any]] = [
        ("demo (1024)", demo_tok, demo_model),
        (f"{big_name} ({len(big_hf)})", big_tok, big_model),
    ]
    for name, tok, model in models:
        t0 = time.perf_counter()
        C.TokenizerBridge._build(tok, tok._tokenizer, model.args.vocab_size)
        bridge_s = time.perf_counter() - t0
        log(f"{name}: bridge built in {bridge_s:.3f} s; measuring the mask")
        row: dict[str, Any] = {
            "bridge_build_s": bridge_s,
            "mask": mask_cost(tok, model.args.vocab_size),
        }
        cases: list[tuple[str, str, bool, bool]] = [  # label, neighbours, overlap, fast
            ("alone", "none", True, True),
            ("unconstrained neighbours", "unconstrained", True, True),
            ("constrained neighbours", "constrained", False, True),
            ("constrained neighbours, overlap", "constrained", True, True),
            ("constrained neighbours, mlx-lm's BatchGenerator", "constrained", False, False),
        ]
        # the cases take turns, so a change in the machine's load hits them alike
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in cases}
        for rep in range(args.repeat):
            for label, nb, overlap, fast in cases:
                r = decode_speed(
                    model,
                    tok,
                    streams=args.streams,
                    neighbours=nb,
                    steps=args.steps,
                    overlap=overlap,
                    fast=fast,
                )
                runs[label].append(r)
                log(f"  [{rep + 1}/{args.repeat}] {label}: {r['unconstrained_tok_s']:.0f} tok/s")
        for label, rs in runs.items():
            rs.sort(key=lambda r: r["unconstrained_tok_s"])
            row[label] = rs[len(rs) // 2]
        results[name] = row

    print(
        f"constraints cost: {args.streams} unconstrained streams, {args.steps} steps, "
        f"median of {args.repeat}"
    )
    for name, row in results.items():
        m = row["mask"]
        print(f"\n{name}: tokenizer bridge built in {row['bridge_build_s'] * 1e3:.0f} ms")
        print(
            f"  mask (consume + compute + apply), {m['tokens']} tokens of random logits: "
            f"mean {m['mask_apply_ms_mean']:.3f} ms, p50 {m['mask_apply_ms_p50']:.3f} ms, "
            f"p99 {m['mask_apply_ms_p99']:.3f} ms"
        )
        for label, r in row.items():
            if isinstance(r, dict) and "unconstrained_tok_s" in r:
                extra = (
                    f", constrained rows ended {r['constrained_rows_ended']}, "
                    f"mask {r['mask_ms_per_token']:.3f} ms/token in the batch"
                    if r["mask_ms_per_token"]
                    else ""
                )
                print(
                    f"  {label:48s} {r['unconstrained_tok_s']:7.0f} tok/s "
                    f"(step {r['step_ms']:.2f} ms{extra})"
                )
        base = row.get("unconstrained neighbours")
        with_c = row.get("constrained neighbours")  # as served: no overlap
        if base and with_c and base["unconstrained_tok_s"]:
            ratio = with_c["unconstrained_tok_s"] / base["unconstrained_tok_s"]
            row["neighbour_ratio"] = ratio
            print(
                f"  unconstrained streams beside constrained ones: {ratio:.2f}x the speed beside "
                f"unconstrained ones ({(1 - ratio) * 100:.0f}% slower; target under 10%)"
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
