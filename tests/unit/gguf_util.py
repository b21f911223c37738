"""Test helpers: tiny GGUF files written with the gguf package, and an independent numpy
forward pass that computes the way llama.cpp does (on the file's own tensor layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# Byte offsets of the float16 scale fields in each block, so random blocks decode to finite
# values of a sensible size; everything else in a block is free bits.
F16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "TQ1_0": [52],
    "TQ2_0": [64],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
    "Q8_1": [0, 2],
}
# Types the gguf package quantizes itself; the others get random raw blocks.
QUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_alphabet() -> list[str]:
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """Specials, the 256 byte tokens and a few merges: a working byte-level BPE."""
    tokens = list(SPECIALS) + byte_alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def _random_blocks(type_name: str, n_elements: int, rng: np.random.Generator) -> np.ndarray:
    qtype = GGMLQuantizationType[type_name]
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_elements // block, size), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        scale = (rng.standard_normal(len(blocks)) * 0.02).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks


def encode_tensor(
    x: np.ndarray, type_name: str, rng: np.random.Generator
) -> tuple[np.ndarray, Optional[GGMLQuantizationType]]:
    """`x` in GGML type `type_name`: real quantization where the gguf package has it, random
    raw blocks of the right layout otherwise (the values of `x` are then ignored)."""
    if type_name == "F32":
        return x.astype(np.float32), None
    if type_name == "F16":
        return x.astype(np.float16), None
    qtype = GGMLQuantizationType[type_name]
    if type_name in QUANTIZABLE:
        return gguf.quants.quantize(x.astype(np.float32), qtype), qtype
    rows, cols = x.shape
    raw = _random_blocks(type_name, rows * cols, rng)
    return raw.reshape(rows, -1), qtype


def write_tiny(
    path: Path,
    weight_type: str = "Q8_0",
    *,
    arch: str = "llama",
    n_layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 512,
    tied: bool = False,
    seed: int = 0,
    extra_tensors: Optional[dict[str, tuple[np.ndarray, Optional[GGMLQuantizationType]]]] = None,
    eot: Optional[int] = None,
) -> Path:
    """A tiny random model in GGUF, every matrix in `weight_type`, norms in F32."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-{weight_type}")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if eot is not None:
        w.add_eot_token_id(eot)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def mat(name: str, rows: int, cols: int, std: float = 0.08) -> None:
        data, raw = encode_tensor(rng.standard_normal((rows, cols)) * std, weight_type, rng)
        w.add_tensor(name, data, raw_dtype=raw)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", vocab, hidden, std=1.0)
    for i in range(n_layers):
        norm(f"blk.{i}.attn_norm.weight", hidden)
        mat(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        mat(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        mat(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        if arch == "qwen2":
            for part, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                bias = (0.1 * rng.standard_normal(n * head_dim)).astype(np.float32)
                w.add_tensor(f"blk.{i}.attn_{part}.bias", bias)
        if arch == "qwen3":
            norm(f"blk.{i}.attn_q_norm.weight", head_dim)
            norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        mat(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        norm(f"blk.{i}.ffn_norm.weight", hidden)
        mat(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        mat(f"blk.{i}.ffn_up.weight", ffn, hidden)
        mat(f"blk.{i}.ffn_down.weight", hidden, ffn)
    norm("output_norm.weight", hidden)
    if not tied:
        mat("output.weight", vocab, hidden, std=0.5)
    for name, (data, raw) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file, decoded by the gguf package to float64, in (rows, cols)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = (
            gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
        )
    return out


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(
    x: np.ndarray, base: float, interleaved: bool, factors: Optional[np.ndarray]
) -> np.ndarray:
    """x: (T, heads, d). llama.cpp's 'normal' RoPE rotates adjacent pairs (2i, 2i+1); NeoX
    style (Qwen) rotates (i, i + d/2). `factors` divide each frequency (rope_freqs)."""
    t, _, d = x.shape
    theta = base ** (-np.arange(0, d, 2) / d)
    if factors is not None:
        theta = theta / factors
    ang = np.arange(t)[:, None, None] * theta[None, None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def reference_logits(
    w: dict[str, np.ndarray],
    ids: list[int],
    *,
    heads: int,
    kv_heads: int,
    n_layers: int,
    base: float,
    eps: float,
    arch: str = "llama",
) -> np.ndarray:
    """Logits (T, vocab) of a float64 forward on the GGUF tensors as stored."""
    interleaved = arch == "llama"
    x = w["token_embd.weight"][ids]
    t = len(ids)
    hidden = x.shape[-1]
    d = w["blk.0.attn_q.weight"].shape[0] // heads
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(n_layers):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = h @ w[p + "attn_q.weight"].T + w.get(p + "attn_q.bias", 0)
        k = h @ w[p + "attn_k.weight"].T + w.get(p + "attn_k.bias", 0)
        v = h @ w[p + "attn_v.weight"].T + w.get(p + "attn_v.bias", 0)
        q, k, v = q.reshape(t, heads, d), k.reshape(t, kv_heads, d), v.reshape(t, kv_heads, d)
        if p + "attn_q_norm.weight" in w:
            q = _rms(q, w[p + "attn_q_norm.weight"], eps)
            k = _rms(k, w[p + "attn_k_norm.weight"], eps)
        factors = w.get("rope_freqs.weight")
        q, k = _rope(q, base, interleaved, factors), _rope(k, base, interleaved, factors)
        rep = heads // kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(d) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(t, heads * d)
        x = x + o @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        g = h @ w[p + "ffn_gate.weight"].T
        silu = g * 0.5 * (1 + np.tanh(g / 2))  # g * sigmoid(g), without overflow
        x = x + (silu * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = _rms(x, w["output_norm.weight"], eps)
    out = w.get("output.weight", w["token_embd.weight"])
    assert x.shape[-1] == hidden
    return x @ out.T


def llama3_rope_factors(dims: int, base: float, factor: float, original: int = 8192) -> np.ndarray:
    """The rope_freqs.weight values llama.cpp's converter writes for Llama 3.1-style scaling."""
    low, high = 1.0, 4.0
    out = []
    for freq in 1.0 / base ** (np.arange(0, dims, 2) / dims):
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


SPM_PIECES = [  # (piece, score): a small SentencePiece BPE vocabulary
    ("▁", -1.0),
    ("t", -2.0),
    ("h", -2.1),
    ("e", -2.2),
    ("a", -2.3),
    ("c", -2.4),
    ("s", -2.5),
    ("o", -2.6),
    ("n", -2.7),
    ("é", -2.8),
    ("1", -2.9),
    ("2", -3.0),
    ("▁t", -3.1),
    ("he", -3.2),
    ("▁the", -3.3),
    ("▁c", -3.4),
    ("at", -3.5),
    ("▁cat", -3.6),
    ("on", -3.7),
    ("▁on", -3.8),
    ("▁s", -3.9),
    ("at▁", -9.0),
    ("▁▁", -4.0),
    ("▁1", -4.1),
]


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """<unk>, <s>, </s>, the 256 byte-fallback tokens, then scored pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for piece, score in SPM_PIECES:
        tokens.append(piece)
        types.append(1)
        scores.append(score)
    return tokens, types, scores


def write_tiny_spm(path: Path, seed: int = 0) -> Path:
    """A tiny Llama with a SentencePiece vocabulary (tokenizer.ggml.model = 'llama')."""
    tokens, types, scores = spm_vocab()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, shape in [
        ("token_embd.weight", (len(tokens), 64)),
        ("blk.0.attn_q.weight", (64, 64)),
        ("blk.0.attn_k.weight", (64, 64)),
        ("blk.0.attn_v.weight", (64, 64)),
        ("blk.0.attn_output.weight", (64, 64)),
        ("blk.0.ffn_gate.weight", (128, 64)),
        ("blk.0.ffn_up.weight", (128, 64)),
        ("blk.0.ffn_down.weight", (64, 128)),
    ]:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float16))
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
