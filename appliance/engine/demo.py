"""The embedded demo model: a tiny Llama built on first use, deterministically, from a fixed seed.

No machine here can download weights, so the package builds a Llama-architecture checkpoint in
the standard Hugging Face layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, ...) under the user cache folder. The tokenizer is a byte-level BPE
trained on `appliance/data/corpus.txt`; the weights are random but seeded, so every build is
byte-identical and greedy output can be compared token by token with `mlx_lm.generate`.

    python -m appliance.engine.demo [--shape llama-1b] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SHAPES", "SPECIAL_TOKENS", "demo_dir", "ensure_demo_model", "main"]

log = logging.getLogger("appliance.demo")

# Bump when the build output changes, so old cache folders are not reused.
VERSION = 1
MARKER = ".complete"
TOKENIZER_VOCAB = 1024

BOS = "<|begin_of_text|>"
EOT = "<|end_of_text|>"
EOS = "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOT, "<|start_header_id|>", "<|end_header_id|>", EOS]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Model shapes. vocab_size None means "the trained tokenizer's size".
SHAPES: dict[str, dict[str, Any]] = {
    "demo": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 384,
        "vocab_size": None,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "seed": 20240611,
        # Large embedding / lm_head scales give peaked, token-dependent logits; projections
        # large enough that attention mixes in the prompt, so greedy output varies with it.
        "std_embed": 1.0,
        "std_proj": 0.15,
        "std_lm_head": 0.5,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "seed": 20240612,
        # Tied: a small embedding scale keeps the current token from always winning its own logit.
        "std_embed": 0.02,
        "std_proj": 0.02,
        "std_lm_head": 0.0,
    },
}

# Output rows of "quiet" tokens (special tokens, bytes that are not printable ASCII, ids past
# the tokenizer's vocab) are scaled down: the model rarely stops on EOS by itself and its greedy
# text is printable, whole UTF-8 characters.
QUIET_ROW_SCALE = 0.25


def demo_dir(base: str | Path | None = None, shape: str = "demo") -> Path:
    """The folder of the demo model of `shape`: under `base`, else under the user cache."""
    if shape not in SHAPES:
        raise ValueError(f"unknown demo shape {shape!r}; allowed: {', '.join(SHAPES)}")
    name = f"demo-{shape}-v{VERSION}"
    if base is not None:
        return Path(base).expanduser() / name
    import platformdirs

    return Path(platformdirs.user_cache_path("appliance")) / "models" / name


def ensure_demo_model(
    base: str | Path | None = None,
    shape: str = "demo",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return the demo model folder, building it first if it is missing or incomplete.

    Safe against concurrent builders: the build happens in a temporary sibling folder under a
    file lock and is renamed into place; a marker file written last flags a complete folder.
    """
    target = demo_dir(base, shape)
    if (target / MARKER).is_file():
        return target
    say = progress or log.info

    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / MARKER).is_file():  # another process finished while we waited
            return target
        prefix = f".{target.name}.tmp-"
        # Holding the lock, any other temp folder is left over from a killed builder.
        for stale in target.parent.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.monotonic()
        say(f"building demo model (shape {shape}) in {target}")
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the model folder is not secret
            _build(tmp, shape, say)
            (tmp / MARKER).write_text(f"demo-{shape}-v{VERSION}\n", encoding="utf-8")
            if target.exists():  # an incomplete earlier attempt
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"done in {time.monotonic() - t0:.1f} s")
    return target


# ---------------------------------------------------------------------------------------------
# Building


def _build(out: Path, shape: str, say: Callable[[str], None]) -> None:
    """Write every file of the demo model of `shape` into the empty folder `out`."""
    spec = dict(SHAPES[shape])
    say("training tokenizer")
    tok = _train_tokenizer()
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = spec["vocab_size"] or tok.get_vocab_size(with_added_tokens=True)
    config = _config(spec, vocab_size, ids)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
    )
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOT},
    )
    _write_json(out / "tokenizer_config.json", _tokenizer_config(ids, config))
    say(f"writing weights ({spec['torch_dtype']}, vocab {vocab_size})")
    row_scale = np.ones(vocab_size, dtype=np.float32)
    row_scale[_quiet_ids(tok, vocab_size)] = QUIET_ROW_SCALE
    if spec["torch_dtype"] == "float32":
        _write_weights_numpy(out / "model.safetensors", spec, config, row_scale)
    else:
        _write_weights_mlx(out / "model.safetensors", spec, config, row_scale, say)


def _corpus_text() -> str:
    from importlib import resources

    return (resources.files("appliance") / "data" / "corpus.txt").read_text(encoding="utf-8")


def _train_tokenizer() -> Any:
    """A byte-level BPE with Llama-3 special tokens, trained on the shipped corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Paragraphs keep their blank line, so "\n\n" (the chat template's separator) is learned.
    paragraphs = [p.strip("\n") + "\n\n" for p in _corpus_text().split("\n\n") if p.strip()]
    tok.train_from_iterator(paragraphs, trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama 3: encode() prepends BOS, so raw-text prompts start like chat prompts.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tok


def _config(spec: dict[str, Any], vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    heads = spec["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec["hidden_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": spec["num_key_value_heads"],
        "head_dim": spec["hidden_size"] // heads,
        "intermediate_size": spec["intermediate_size"],
        "vocab_size": vocab_size,
        "max_position_embeddings": spec["max_position_embeddings"],
        "rope_theta": spec["rope_theta"],
        "rope_scaling": None,
        "rms_norm_eps": spec["rms_norm_eps"],
        "tie_word_embeddings": spec["tie_word_embeddings"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": spec["std_proj"],
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": spec["torch_dtype"],
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[EOT]],
    }


def _tokenizer_config(ids: dict[str, int], config: dict[str, Any]) -> dict[str, Any]:
    return {
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in sorted(ids.items(), key=lambda kv: kv[1])
        },
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOT,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _quiet_ids(tok: Any, vocab_size: int) -> list[int]:
    """Ids the model should rarely emit: special, unprintable or past the tokenizer's vocab."""
    n = tok.get_vocab_size(with_added_tokens=True)
    special = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    quiet = []
    for i in range(n):
        text = tok.decode([i], skip_special_tokens=False)
        if i in special or not all(c == "\n" or (c.isprintable() and c.isascii()) for c in text):
            quiet.append(i)
    return quiet + list(range(n, vocab_size))


def _tensor_specs(
    spec: dict[str, Any], config: dict[str, Any]
) -> Iterator[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) of every weight in a fixed order; std 0 means ones (norms)."""
    h = config["hidden_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    q = config["num_attention_heads"] * config["head_dim"]
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    std = spec["std_proj"]
    yield "model.embed_tokens.weight", (vocab, h), spec["std_embed"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), 0.0
        yield p + "self_attn.q_proj.weight", (q, h), std
        yield p + "self_attn.k_proj.weight", (kv, h), std
        yield p + "self_attn.v_proj.weight", (kv, h), std
        yield p + "self_attn.o_proj.weight", (h, q), std
        yield p + "post_attention_layernorm.weight", (h,), 0.0
        yield p + "mlp.gate_proj.weight", (inter, h), std
        yield p + "mlp.up_proj.weight", (inter, h), std
        yield p + "mlp.down_proj.weight", (h, inter), std
    yield "model.norm.weight", (h,), 0.0
    if not config["tie_word_embeddings"]:
        yield "lm_head.weight", (vocab, h), spec["std_lm_head"]


def _output_name(config: dict[str, Any]) -> str:
    return "model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"


def _write_weights_numpy(
    path: Path, spec: dict[str, Any], config: dict[str, Any], row_scale: np.ndarray
) -> None:
    """float32 weights from numpy's seeded generator (small shapes)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(spec["seed"])
    weights: dict[str, np.ndarray] = {}
    for name, shape, std in _tensor_specs(spec, config):
        if std == 0.0:
            w = np.ones(shape, dtype=np.float32)
        else:
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        if name == _output_name(config):
            w *= row_scale[:, None]
        weights[name] = w
    save_file(weights, str(path), metadata={"format": "pt"})


def _write_weights_mlx(
    path: Path,
    spec: dict[str, Any],
    config: dict[str, Any],
    row_scale: np.ndarray,
    say: Callable[[str], None],
) -> None:
    """bfloat16 weights from mlx's seeded generator, one tensor at a time (large shapes)."""
    import mlx.core as mx

    key = mx.random.key(spec["seed"])
    weights: dict[str, Any] = {}
    layers = config["num_hidden_layers"]
    for name, shape, std in _tensor_specs(spec, config):
        if name.endswith(".input_layernorm.weight"):  # a long job: one line per layer
            say(f"  layer {int(name.split('.')[2]) + 1}/{layers}")
        key, sub = mx.random.split(key)
        if std == 0.0:
            w = mx.ones(shape, dtype=mx.bfloat16)
        else:
            w = mx.random.normal(shape, dtype=mx.bfloat16, scale=std, key=sub)
        if name == _output_name(config):
            w = w * mx.array(row_scale, dtype=mx.bfloat16)[:, None]
        mx.eval(w)  # materialise now so only one float temporary exists at a time
        weights[name] = w
    say("  saving")
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Command line: build the demo model (if needed) and print its folder."""
    ap = argparse.ArgumentParser(prog="python -m appliance.engine.demo", description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--dir", default=None, help="base folder (default: the user cache)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    print(ensure_demo_model(args.dir, shape=args.shape))


if __name__ == "__main__":
    main()
