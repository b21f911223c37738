"""The built-in SmolLM2 (Q4_1 GGUF) through the GGUF loader: real answers, logits equal to an
independent numpy forward, token ids equal to transformers' own GGUF tokenizer conversion.

SmolLM2 is slow on CPU: one module-scoped load, short prompts, few tokens."""

from __future__ import annotations

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

from appliance.engine.builtin import fetch_smollm2, smollm2_path
from appliance.engine.gguf import inspect, load
from appliance.errors import ModelLoadError

from ..unit.gguf_util import gguf_tensors, reference_logits

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world 123 4567 x1y22 and 3.14159",
    "café naïve Ünïcödé résumé",
    "emoji 😀👍🏽 done",
    "北京欢迎你 日本語のテキスト 한국어",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "tabs\tand\n\nnewlines   spaces",
    "<|endoftext|> <jupyter_code> x",
]


@pytest.fixture(scope="module")
def smol_file() -> Path:
    return fetch_smollm2(progress=lambda _msg: None)


@pytest.fixture(scope="module")
def smol(smol_file: Path, tmp_path_factory: pytest.TempPathFactory):
    return load(smol_file, cache_dir=tmp_path_factory.mktemp("gguf-cache"))


def greedy(model, prompt: list[int], n: int) -> list[int]:
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(
        mx.array(prompt), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)
    ):
        out.append(int(token))
    return out


def test_capital_of_france(smol) -> None:
    model, tok = smol
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = greedy(model, prompt, 12)
    assert "Paris" in tok.decode(ids)


def test_logits_match_independent_forward(smol, smol_file: Path) -> None:
    """Logits of the first greedy steps equal a float64 numpy forward on the GGUF tensors as
    stored (gguf.quants.dequantize, llama.cpp's interleaved RoPE on its permuted q/k rows)."""
    model, tok = smol
    info = inspect(smol_file)
    weights = gguf_tensors(smol_file)
    ids = tok.encode("The three primary colors are", add_special_tokens=False)
    steps = greedy(model, ids, 3)
    seq = ids + steps
    want = reference_logits(
        weights,
        seq,
        heads=info.n_heads,
        kv_heads=info.n_kv_heads,
        n_layers=info.n_layers,
        base=100000.0,
        eps=1e-5,
    )
    got = np.array(model(mx.array([seq]))[0].astype(mx.float32))
    # Stated tolerance: 1e-4 of the logit range (float32 MLX vs float64 numpy over 30 layers;
    # measured about 2e-6).
    span = np.ptp(want)
    print(f"max logit difference: {np.abs(got - want).max():.2e} of a range of {span:.1f}")
    assert np.abs(got - want).max() < 1e-4 * span, np.abs(got - want).max() / span
    # the greedy continuation is the reference's argmax at every step
    assert [int(i) for i in want[len(ids) - 1 : -1].argmax(-1)] == steps


def test_token_ids_equal_transformers_conversion(smol, smol_file: Path) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = gguf.GGUFReader(str(smol_file))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}
    spec = {
        name: fields[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in fields
    }
    reference, _ = convert_gguf_tokenizer("llama", spec)
    _, tok = smol
    for text in TEXTS:
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == reference.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ours) == text
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert tok.eos_token_ids == {2}


def test_smollm2_path_checks_the_file(smol_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "smollm2"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="python -m appliance.engine.builtin fetch"):
        smollm2_path(str(tmp_path))
    bad = folder / smol_file.name
    bad.write_bytes(b"\0" * smol_file.stat().st_size)
    with pytest.raises(ModelLoadError, match="wrong checksum"):
        smollm2_path(str(tmp_path))
    bad.unlink()
    (folder / smol_file.name).symlink_to(smol_file)
    assert smollm2_path(str(tmp_path)) == folder / smol_file.name
