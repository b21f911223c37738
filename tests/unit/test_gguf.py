"""GGUF loading on tiny files written here with the gguf package's own writer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from appliance.engine.gguf import cache_folder, convert, inspect, load
from appliance.errors import ModelLoadError

from .gguf_util import (
    encode_tensor,
    gguf_tensors,
    llama3_rope_factors,
    reference_logits,
    write_tiny,
)

HEADS, KV_HEADS, LAYERS = 4, 2, 2
HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.{parts[3]}"
    return f"{HF_NAMES[parts[0]]}.{parts[1]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to attn_q/attn_k rows (HF order -> GGUF order)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def dense_params(model) -> dict[str, np.ndarray]:
    """Every weight of the loaded model as float64, quantized ones dequantized by MLX."""
    quantized = {name: m for name, m in model.named_modules() if hasattr(m, "bits")}
    out = {}
    for name, value in tree_flatten(model.parameters()):
        base, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases"):
            continue
        if base in quantized:
            m = quantized[base]
            value = mx.dequantize(
                value,
                m.scales.astype(mx.float32),
                m.biases.astype(mx.float32),
                group_size=m.group_size,
                bits=m.bits,
            )
        out[name] = np.array(value.astype(mx.float32)).astype(np.float64)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize("wtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K"])
def test_exact_types_load_as_stored(files: Path, tmp_path: Path, wtype: str) -> None:
    path = write_tiny(files / f"tiny-{wtype}.gguf", wtype)
    model, _ = load(path, cache_dir=tmp_path, dtype=mx.float32)
    got = dense_params(model)
    ref = gguf_tensors(path)
    assert len(ref) == gguf.GGUFReader(str(path)).fields["GGUF.tensor_count"].contents()
    for name, want in ref.items():
        have = got[hf_name(name)]
        if ".attn_q." in name:
            have = llama_cpp_permute(have, HEADS)
        elif ".attn_k." in name:
            have = llama_cpp_permute(have, KV_HEADS)
        np.testing.assert_allclose(
            have, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name
        )


@pytest.mark.parametrize("wtype", ["Q8_0", "Q4_K", "BF16"])
def test_forward_matches_llama_cpp_layout(files: Path, tmp_path: Path, wtype: str) -> None:
    """Logits equal a numpy forward that uses the file's own (permuted) q/k rows with
    llama.cpp's interleaved RoPE: the permutation is undone correctly."""
    path = write_tiny(files / f"fwd-{wtype}.gguf", wtype, seed=3)
    model, tokenizer = load(path, cache_dir=tmp_path, dtype=mx.float32)
    ids = tokenizer.encode("the cat sat on the mat, then ran in")
    assert len(ids) > 8
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    want = reference_logits(
        gguf_tensors(path),
        ids,
        heads=HEADS,
        kv_heads=KV_HEADS,
        n_layers=LAYERS,
        base=10000.0,
        eps=1e-5,
    )
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-4 * scale, np.abs(got - want).max() / scale
    # without undoing the permutation the same comparison fails, so the test can fail
    wrong = reference_logits(
        gguf_tensors(path),
        ids,
        heads=HEADS,
        kv_heads=KV_HEADS,
        n_layers=LAYERS,
        base=10000.0,
        eps=1e-5,
        arch="qwen2",
    )
    assert np.abs(wrong - want).max() > 1e-2 * scale


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_families(files: Path, tmp_path: Path, arch: str) -> None:
    path = write_tiny(files / f"{arch}.gguf", "Q8_0", arch=arch, tied=True, seed=5)
    model, tokenizer = load(path, cache_dir=tmp_path, dtype=mx.float32)
    ids = tokenizer.encode("in the er on")
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    want = reference_logits(
        gguf_tensors(path),
        ids,
        heads=HEADS,
        kv_heads=KV_HEADS,
        n_layers=LAYERS,
        base=10000.0,
        eps=1e-5,
        arch=arch,
    )
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("wtype", ["Q6_K", "Q2_K", "Q3_K", "IQ4_NL", "TQ1_0"])
def test_other_types_are_decoded_not_dropped(files: Path, tmp_path: Path, wtype: str) -> None:
    """mx.load drops TQ1_0 and mis-decodes or rounds the K types; here each is decoded by the
    gguf package and re-quantized to 8 bits (default), or kept dense on request."""
    path = write_tiny(files / f"tiny-{wtype}.gguf", wtype, seed=7)
    ref = gguf_tensors(path)
    model, _ = load(path, cache_dir=tmp_path, dtype=mx.float32)
    got = dense_params(model)
    for name, want in ref.items():
        have = got[hf_name(name)]
        if ".attn_q." in name:
            have = llama_cpp_permute(have, HEADS)
        elif ".attn_k." in name:
            have = llama_cpp_permute(have, KV_HEADS)
        # 8-bit affine over groups of 32: error under one step of 1/255 of the range
        assert np.abs(have - want).max() <= np.ptp(want) / 255 + 1e-6, name
    source = json.loads((cache_folder(path, tmp_path, 8) / "gguf_source.json").read_text())
    assert "blk.0.ffn_up.weight" in source["requantized"]

    dense, _ = load(path, cache_dir=tmp_path, dtype=mx.float32, requantize_bits=None)
    have = dict(tree_flatten(dense.parameters()))["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_array_equal(np.array(have), ref["blk.0.ffn_up.weight"].astype(np.float32))


def test_exact_repack_equals_mx_load(files: Path) -> None:
    """Where mx.load is right (Q4_0, Q4_1, Q8_0), the repacked arrays are bit for bit its own."""
    from appliance.engine.gguf.quant import convert as convert_tensor
    from appliance.engine.gguf.reader import read_header, tensor_bytes

    for wtype in ("Q4_0", "Q4_1", "Q8_0"):
        path = write_tiny(files / f"mx-{wtype}.gguf", wtype, seed=11)
        theirs = mx.load(str(path))
        header = read_header(path)
        t = next(t for t in header.tensors if t.name == "blk.1.ffn_down.weight")
        mine = convert_tensor(tensor_bytes(path, t), t.type_name, t.shape, requantize_bits=None)
        assert np.array_equal(np.array(mine.weight), np.array(theirs["blk.1.ffn_down.weight"]))
        for key, arr in (("scales", mine.scales), ("biases", mine.biases)):
            np.testing.assert_array_equal(
                np.array(arr), np.array(theirs[f"blk.1.ffn_down.{key}"].astype(mx.float32))
            )


def test_unreadable_type_is_named(files: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data, raw = encode_tensor(np.zeros((4, 256)), "Q8_1", rng)
    path = write_tiny(
        files / "q8_1.gguf", "Q8_0", extra_tensors={"blk.0.extra.weight": (data, raw)}
    )
    info = inspect(path)
    assert not info.loadable and "Q8_1" in (info.problem or "")
    with pytest.raises(ModelLoadError, match="Q8_1"):
        load(path, cache_dir=tmp_path)


def test_unsupported_architecture_is_named(files: Path, tmp_path: Path) -> None:
    path = write_tiny(files / "falcon.gguf", "Q8_0", arch="falcon")
    with pytest.raises(ModelLoadError, match="'falcon'"):
        load(path, cache_dir=tmp_path)


def _with_tensor_count(src: Path, dst: Path, delta: int) -> Path:
    blob = bytearray(src.read_bytes())
    (count,) = struct.unpack_from("<Q", blob, 8)
    struct.pack_into("<Q", blob, 8, count + delta)
    dst.write_bytes(bytes(blob))
    return dst


@pytest.mark.parametrize("delta", [1, -1])
def test_tensor_count_mismatch_does_not_load(files: Path, tmp_path: Path, delta: int) -> None:
    good = write_tiny(files / "count.gguf", "Q8_0")
    bad = _with_tensor_count(good, tmp_path / f"count{delta:+d}.gguf", delta)
    with pytest.raises(ModelLoadError):
        load(bad, cache_dir=tmp_path / "cache")


def test_truncated_file_is_refused(files: Path, tmp_path: Path) -> None:
    good = write_tiny(files / "trunc.gguf", "Q8_0")
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        inspect(bad)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        inspect(Path(__file__))
    with pytest.raises(ModelLoadError, match="not found"):
        load(tmp_path / "missing.gguf", cache_dir=tmp_path)


def test_inspect_reads_the_header(files: Path) -> None:
    path = write_tiny(files / "inspect.gguf", "Q4_K", tied=True)
    info = inspect(path)
    reader = gguf.GGUFReader(str(path))
    assert info.architecture == "llama" and info.loadable
    assert info.tensor_count == len(reader.tensors) == 2 + LAYERS * 9
    assert info.tensor_types == {"Q4_K": 1 + LAYERS * 7, "F32": 1 + LAYERS * 2}
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (LAYERS, 4, 2, 64)
    assert info.kv_bytes_per_token == 2 * LAYERS * 2 * 64 * 2
    assert info.weight_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert info.context_length == 512 and info.file_bytes == path.stat().st_size


def test_cache_is_reused_and_follows_the_file(files: Path, tmp_path: Path) -> None:
    path = write_tiny(tmp_path / "cached.gguf", "Q8_0")
    first = convert(path, tmp_path / "cache")
    stamp = (first / ".complete").stat().st_mtime_ns
    assert convert(path, tmp_path / "cache") == first
    assert (first / ".complete").stat().st_mtime_ns == stamp
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = convert(path, tmp_path / "cache")
    assert second != first and (second / ".complete").is_file()


def test_dtype_follows_device_or_request(files: Path, tmp_path: Path) -> None:
    path = write_tiny(files / "dtype.gguf", "Q4_0")
    model, _ = load(path, cache_dir=tmp_path)
    params = dict(tree_flatten(model.parameters()))
    expected = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    assert params["model.layers.0.self_attn.q_proj.scales"].dtype == expected
    assert params["model.norm.weight"].dtype == expected
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    model, _ = load(path, cache_dir=tmp_path, dtype=mx.bfloat16)
    params = dict(tree_flatten(model.parameters()))
    assert params["model.layers.0.mlp.up_proj.biases"].dtype == mx.bfloat16


def test_tokenizer_and_chat_template(files: Path, tmp_path: Path) -> None:
    path = write_tiny(files / "tok.gguf", "Q8_0")
    _, tok = load(path, cache_dir=tmp_path)
    text = "<|im_start|>the théâtre 42 ✓<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2  # control tokens stay whole
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == {2}
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    detok = tok.detokenizer
    detok.reset()
    for i in tok.encode("the theatre", add_special_tokens=False):
        detok.add_token(i)
    detok.finalize()
    assert detok.text == "the theatre"


def test_llama3_rope_factors_become_rope_scaling(files: Path, tmp_path: Path) -> None:
    """Llama 3.1-style files store RoPE scaling as rope_freqs.weight; it becomes mlx-lm's
    llama3 rope_scaling, checked equal, and the forward matches llama.cpp's use of it."""
    factors = llama3_rope_factors(64, 10000.0, factor=8.0)
    assert len(set(factors.round(4))) > 3  # all three regions of the curve are exercised
    path = write_tiny(
        files / "llama3.gguf",
        "Q8_0",
        seed=13,
        eot=3,
        extra_tensors={"rope_freqs.weight": (factors, None)},
    )
    model, tok = load(path, cache_dir=tmp_path, dtype=mx.float32)
    config = json.loads((cache_folder(path, tmp_path, 8) / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert tok.eos_token_ids == {2, 3}
    periods = 10000.0 ** (np.arange(0, 64, 2) / 64) * factors
    np.testing.assert_allclose(
        np.array(model.model.layers[0].self_attn.rope._freqs), periods, rtol=1e-5
    )
    ids = list(range(10, 40))
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    want = reference_logits(
        gguf_tensors(path),
        ids,
        heads=HEADS,
        kv_heads=KV_HEADS,
        n_layers=LAYERS,
        base=10000.0,
        eps=1e-5,
    )
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()

    odd = write_tiny(
        files / "odd-rope.gguf",
        "Q8_0",
        extra_tensors={"rope_freqs.weight": (factors[::-1].copy(), None)},
    )
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        load(odd, cache_dir=tmp_path)


@pytest.mark.parametrize("wtype", ["Q4_K", "Q6_K", "F16"])
def test_memory_estimate_matches_the_loaded_model(files: Path, tmp_path: Path, wtype: str) -> None:
    path = write_tiny(files / f"mem-{wtype}.gguf", wtype, tied=True)
    model, _ = load(path, cache_dir=tmp_path, dtype=mx.float32)
    loaded = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert inspect(path).memory_bytes(float_bytes=4) == loaded


def test_sentencepiece_vocabulary_matches_transformers(files: Path, tmp_path: Path) -> None:
    """SentencePiece files (Llama 2, Mistral): ids equal transformers' own GGUF conversion,
    with BOS added, byte fallback for what no piece covers, and exact round trips."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    from .gguf_util import spm_vocab, write_tiny_spm

    path = write_tiny_spm(files / "spm.gguf")
    model, tok = load(path, cache_dir=tmp_path)
    tokens, types, scores = spm_vocab()
    reference, _ = convert_gguf_tokenizer(
        "llama",
        {
            "tokenizer_type": "llama",
            "tokens": tokens,
            "token_type": types,
            "scores": scores,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "unk_token_id": 0,
        },
    )
    for text in ["the cat sat on the mat", "the  cat 12 café", "über 😀 猫", "a  b\n c"]:
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == reference.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ours) == text
    # Text that starts with a space: llama.cpp (and sentencepiece) still prefix one, giving
    # "▁▁the"; transformers' Metaspace skips the prefix there. We follow llama.cpp.
    ours = tok.encode(" the", add_special_tokens=False)
    assert [tokens[i] for i in ours] == ["▁", "▁the"]
    assert [tokens[i] for i in reference.encode(" the", add_special_tokens=False).ids] == ["▁the"]
    assert tok.decode(ours) == " the"
    ids = tok.encode("the cat")
    assert ids[0] == 1 and tokens[ids[1]] == "▁the" and tokens[ids[2]] == "▁cat"
    assert tokens[tok.encode("😀", add_special_tokens=False)[1]] == "<0xF0>"  # byte fallback
    assert model(mx.array([ids])).shape == (1, len(ids), len(tokens))
    detok = tok.detokenizer
    detok.reset()
    for i in tok.encode("the cat on", add_special_tokens=False):
        detok.add_token(i)
    detok.finalize()
    assert detok.text == "the cat on"


def test_dequantized_load_gives_the_same_model(files: Path, tmp_path: Path) -> None:
    path = write_tiny(files / "deq.gguf", "Q4_K", seed=17)
    quantized, tok = load(path, cache_dir=tmp_path, dtype=mx.float32)
    dense, _ = load(path, cache_dir=tmp_path, dtype=mx.float32, dequantize=True)
    assert not any(hasattr(m, "bits") for _, m in dense.named_modules())
    params = dict(tree_flatten(dense.parameters()))
    assert params["model.layers.0.mlp.up_proj.weight"].dtype == mx.float32
    assert sum(v.nbytes for v in params.values()) == inspect(path).memory_bytes(4, dequantize=True)
    ids = mx.array([tok.encode("the theatre on the")])
    a, b = np.array(quantized(ids)), np.array(dense(ids))
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()
