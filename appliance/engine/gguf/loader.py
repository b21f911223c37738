"""GGUF files -> mlx-lm models: inspection, conversion into a cached MLX folder, loading.

A GGUF file is converted once into an ordinary MLX model folder (config.json, safetensors
shards, tokenizer.json, tokenizer_config.json) under `cache_dir`, keyed by the file's path,
size and modification time, and then loaded like any MLX folder with mlx-lm's own loader.
Every tensor the header lists is converted or the load fails naming it: nothing is dropped.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...errors import ModelLoadError
from . import quant
from .reader import GGUFHeader, read_header, tensor_bytes

__all__ = [
    "ARCHITECTURES",
    "GGUFInfo",
    "cache_folder",
    "convert",
    "default_cache_dir",
    "default_dtype",
    "inspect",
    "load",
]

log = logging.getLogger("appliance.gguf")

# Bump when the conversion output changes, so older cache folders are not reused.
VERSION = 1
MARKER = ".complete"
SHARD_BYTES = 2 << 30
DEFAULT_REQUANTIZE_BITS = 8


@dataclass(frozen=True)
class Architecture:
    """How a GGUF architecture maps onto an mlx-lm model module."""

    model_type: str  # mlx_lm.models.<model_type>
    # llama.cpp's converter reorders attn_q/attn_k rows for its RoPE layout in these.
    permute_qk: bool


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", permute_qk=True),
    "qwen2": Architecture("qwen2", permute_qk=False),
    "qwen3": Architecture("qwen3", permute_qk=False),
}


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file holds, from its header alone (no tensor data is read)."""

    path: Path
    architecture: str
    name: str
    tensor_count: int  # as the header states it
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    context_length: int
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_bytes_per_token: int  # float16 keys and values over all layers
    weight_bytes: int  # tensor data as stored in the file
    file_bytes: int
    problem: Optional[str]  # why it cannot be loaded, or None
    # (GGML type name, element count) of every tensor, for memory_bytes
    tensor_sizes: tuple[tuple[str, int], ...] = field(default=(), repr=False)

    @property
    def loadable(self) -> bool:
        return self.problem is None

    def memory_bytes(
        self,
        float_bytes: int = 4,
        requantize_bits: Optional[int] = DEFAULT_REQUANTIZE_BITS,
        dequantize: bool = False,
    ) -> int:
        """Bytes of the loaded weights: packed integers stay packed (unless `dequantize`),
        everything float takes `float_bytes` (4 for float32 on CPU, 2 for float16/bfloat16)."""
        if dequantize:
            return sum(n for _, n in self.tensor_sizes) * float_bytes
        total = 0
        for type_name, n in self.tensor_sizes:
            bits = quant.EXACT[type_name][0] if type_name in quant.EXACT else None
            if bits is None and type_name not in quant.DENSE and requantize_bits:
                bits = requantize_bits
            if bits is None or n % quant.GROUP:
                total += n * float_bytes
            else:  # packed integers plus a scale and a bias per group of 32
                total += n * bits // 8 + 2 * (n // quant.GROUP) * float_bytes
        return total


def _meta(header: GGUFHeader, key: str, default: Any = None) -> Any:
    value = header.metadata.get(f"{header.architecture}.{key}", default)
    if isinstance(value, np.ndarray):  # per-layer values (some hybrids): take the largest
        value = int(value.max()) if value.size else default
    return value


def _problem(header: GGUFHeader) -> Optional[str]:
    arch = header.architecture
    if arch not in ARCHITECTURES:
        return f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
    for t in header.tensors:
        if not quant.supported(t.type_name):
            return f"tensor {t.name} is of GGML type {t.type_name}, which cannot be read"
    _, rope_problem = _rope_freqs_scaling(header)
    if rope_problem:
        return rope_problem
    scaling = _meta(header, "rope.scaling.type")
    if scaling not in (None, "none", "linear", "yarn"):
        return f"RoPE scaling {scaling!r} is not supported"
    kind = header.metadata.get("tokenizer.ggml.model")
    if kind is None:
        return "the file carries no tokenizer (tokenizer.ggml.model)"
    if kind not in ("gpt2", "llama"):
        return f"tokenizer model {kind!r} is not supported ('gpt2' and 'llama' are)"
    return None


def inspect(path: str | Path) -> GGUFInfo:
    """Describe the GGUF file at `path` from its header: cheap, for memory estimates."""
    header = read_header(path)
    heads = int(_meta(header, "attention.head_count", 0) or 0)
    kv_heads = int(_meta(header, "attention.head_count_kv", heads) or heads)
    hidden = int(_meta(header, "embedding_length", 0) or 0)
    head_dim = int(
        _meta(header, "attention.key_length", 0)
        or _meta(header, "rope.dimension_count", 0)
        or (hidden // heads if heads else 0)
    )
    layers = int(_meta(header, "block_count", 0) or 0)
    tokens = header.metadata.get("tokenizer.ggml.tokens") or []
    return GGUFInfo(
        path=header.path,
        architecture=header.architecture,
        name=str(header.metadata.get("general.name", header.path.stem)),
        tensor_count=header.tensor_count,
        tensor_types=dict(collections.Counter(t.type_name for t in header.tensors)),
        context_length=int(_meta(header, "context_length", 0) or 0),
        n_layers=layers,
        hidden_size=hidden,
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_meta(header, "vocab_size", 0) or len(tokens)),
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * 2,
        weight_bytes=sum(t.n_bytes for t in header.tensors),
        file_bytes=header.file_bytes,
        problem=_problem(header),
        tensor_sizes=tuple((t.type_name, int(np.prod(t.shape))) for t in header.tensors),
    )


ROPE_FREQS = "rope_freqs.weight"


def _rope_freqs_scaling(header: GGUFHeader) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """Llama 3.1-style RoPE scaling, which llama.cpp stores as per-frequency factors in a
    `rope_freqs.weight` tensor instead of metadata: recover mlx-lm's `llama3` rope_scaling
    whose factors equal the stored ones, or name the problem."""
    info = next((t for t in header.tensors if t.name == ROPE_FREQS), None)
    if info is None:
        return None, None
    if info.type_name != "F32":
        return None, f"{ROPE_FREQS} of type {info.type_name} is not supported"
    stored = np.asarray(tensor_bytes(header.path, info)).view("<f4").reshape(-1).astype(np.float64)
    base = float(_meta(header, "rope.freq_base", 10000.0))
    dims = 2 * stored.size
    wavelen = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    factor = float(stored.max())
    originals = [_meta(header, "rope.scaling.original_context_length"), 8192]
    for original in [int(o) for o in originals if o]:
        low, high = 1.0, 4.0  # the values every Llama 3.x release uses
        smooth = (original / wavelen - low) / (high - low)
        expected = np.where(
            wavelen < original / high,
            1.0,
            np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)),
        )
        if np.allclose(expected, stored, rtol=1e-5, atol=0):
            scaling = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
            return scaling, None
    return None, f"{ROPE_FREQS} holds RoPE factors that match no Llama 3 scaling"


def model_config(header: GGUFHeader) -> dict[str, Any]:
    """The Hugging Face style config.json of the model, from the GGUF metadata.

    Key names come from transformers' GGUF tables (transformers.integrations.ggml), which
    need no torch; the rest are what those tables leave out.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = header.architecture
    spec = ARCHITECTURES[arch]
    config: dict[str, Any] = {"model_type": spec.model_type}
    table: dict[str, Optional[str]] = dict(
        GGUF_CONFIG_MAPPING.get(arch) or GGUF_CONFIG_MAPPING["llama"]
    )  # type: ignore[call-overload]
    for key, hf_key in table.items():
        value = _meta(header, key)
        if hf_key and value is not None:
            config[hf_key] = value.item() if hasattr(value, "item") else value
    names = {t.name for t in header.tensors}
    key_length = _meta(header, "attention.key_length")
    if key_length:
        config["head_dim"] = int(key_length)
    config.setdefault("num_key_value_heads", config.get("num_attention_heads"))
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config.setdefault("vocab_size", len(header.metadata.get("tokenizer.ggml.tokens") or []))
    config["tie_word_embeddings"] = "output.weight" not in names
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    scaling = _meta(header, "rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope: dict[str, Any] = {
            "type": scaling,
            "factor": float(_meta(header, "rope.scaling.factor")),
        }
        original = _meta(header, "rope.scaling.original_context_length")
        if original:
            rope["original_max_position_embeddings"] = int(original)
        config["rope_scaling"] = rope
    llama3, _ = _rope_freqs_scaling(header)
    if llama3:
        config["rope_scaling"] = llama3
    for key in ("bos_token_id", "padding_token_id"):
        value = header.metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key.replace("padding", "pad")] = int(value)
    # Generation stops at end of sequence, end of turn (Llama 3's <|eot_id|>) or end of message.
    stops = [header.metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stop_ids = sorted({int(v) for v in stops if v is not None})
    if stop_ids:
        config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    return config


def _permute(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """Undo llama.cpp's row order for RoPE (pairs of adjacent rows -> two half blocks)."""

    def undo(a: np.ndarray) -> np.ndarray:
        rows = a.shape[0]
        out = a.reshape(n_head, rows // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2)
        return np.ascontiguousarray(out.reshape(a.shape))

    return undo


def _name_map(header: GGUFHeader, config: dict[str, Any], model: Any) -> dict[str, str]:
    """GGUF tensor base name -> mlx-lm parameter base name, from llama.cpp's own table
    (gguf.TensorNameMap) applied to the parameter names of the mlx-lm model."""
    import gguf
    from mlx.utils import tree_flatten

    arch_ids = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    table = gguf.get_tensor_name_map(arch_ids[header.architecture], config["num_hidden_layers"])
    mapping: dict[str, str] = {}
    for name, _ in tree_flatten(model.parameters()):  # type: ignore[str-unpack]
        base = name.rsplit(".", 1)[0]
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            mapping[gguf_name] = base
    return mapping


def default_cache_dir(models_dir: Optional[str | Path] = None) -> Path:
    """Where converted GGUF files go: `models_dir`/gguf, else the user cache's models/gguf
    (the base folder of the demo and SmolLM2 models)."""
    if models_dir is not None:
        return Path(models_dir).expanduser() / "gguf"
    import platformdirs

    return Path(platformdirs.user_cache_path("appliance")) / "models" / "gguf"


def _identity(path: Path, requantize_bits: Optional[int]) -> str:
    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, VERSION, requantize_bits])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_folder(path: str | Path, cache_dir: str | Path, requantize_bits: Optional[int]) -> Path:
    """Where the converted form of the file at `path` lives (whether or not it exists yet)."""
    path = Path(path).expanduser()
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:80]
    return Path(cache_dir).expanduser() / f"{stem}-{_identity(path, requantize_bits)}"


def convert(
    path: str | Path,
    cache_dir: str | Path,
    *,
    requantize_bits: Optional[int] = DEFAULT_REQUANTIZE_BITS,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Return the MLX folder converted from the GGUF file at `path`, converting it first if
    the cache has none for this file (same path, size and modification time).

    `requantize_bits`: tensors of types MLX cannot hold exactly (Q2_K, Q3_K, Q6_K, IQ*, ...)
    are decoded to float32 and quantized again to this many bits (group 32); None keeps them
    dense. Exact types (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) are always
    carried over exactly.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    target = cache_folder(path, cache_dir, requantize_bits)
    if (target / MARKER).is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / MARKER).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _convert_into(path, tmp, requantize_bits, progress or log.info)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_into(
    path: Path, out: Path, requantize_bits: Optional[int], say: Callable[[str], None]
) -> None:
    import mlx.core as mx

    started = time.monotonic()
    header = read_header(path)
    problem = _problem(header)
    if problem:
        raise ModelLoadError(f"{path}: {problem}")
    config = model_config(header)
    say(f"converting {path.name}: {header.architecture}, {len(header.tensors)} tensors")

    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    names = _name_map(header, config, model)
    spec = ARCHITECTURES[header.architecture]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    shard: dict[str, Any] = {}
    shard_files: list[Path] = []
    shard_bytes = 0
    written: set[str] = set()
    bits_seen: collections.Counter[int] = collections.Counter()
    requantized: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            file = out / f"model-{len(shard_files) + 1:05d}.safetensors"
            mx.save_safetensors(str(file), shard, metadata={"format": "mlx"})
            shard_files.append(file)
            shard, shard_bytes = {}, 0

    for i, t in enumerate(header.tensors):
        base, _, suffix = t.name.rpartition(".")
        if t.name == ROPE_FREQS:  # carried by config["rope_scaling"], checked equal
            continue
        target = names.get(base)
        if target is None or suffix not in ("weight", "bias"):
            raise ModelLoadError(
                f"{path}: tensor {t.name} has no place in mlx-lm's {spec.model_type} model"
            )
        transform = None
        if spec.permute_qk and base.endswith((".attn_q", ".attn_k")):
            transform = _permute(heads if base.endswith(".attn_q") else kv_heads)
        c = quant.convert(
            tensor_bytes(path, t),
            t.type_name,
            t.shape,
            requantize_bits=requantize_bits if suffix == "weight" else None,
            row_transform=transform,
            name=t.name,
        )
        arrays = {f"{target}.{suffix}": c.weight}
        if c.bits:
            arrays[f"{target}.scales"] = c.scales
            arrays[f"{target}.biases"] = c.biases
            bits_seen[c.bits] += 1
        if not c.exact:
            requantized.append(t.name)
        mx.eval(list(arrays.values()))
        shard.update(arrays)
        written.add(f"{target}.{suffix}")
        shard_bytes += sum(a.nbytes for a in arrays.values())
        if shard_bytes >= SHARD_BYTES:
            flush()
        if (i + 1) % 50 == 0:
            say(f"  {i + 1}/{len(header.tensors)} tensors")
    flush()

    from mlx.utils import tree_flatten

    expected = {n for n, _ in tree_flatten(model.parameters())}  # type: ignore[str-unpack]
    if config["tie_word_embeddings"]:
        expected = {n for n in expected if not n.startswith("lm_head.")}
    missing = sorted(expected - written)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(
            f"{path}: the file lacks {len(missing)} tensors the model needs: {shown}"
        )
    for i, file in enumerate(shard_files):
        file.rename(out / f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors")

    if bits_seen:
        config["quantization"] = {
            "group_size": quant.GROUP,
            "bits": bits_seen.most_common(1)[0][0],
            "mode": "affine",
        }
    (out / "config.json").write_text(json.dumps(config, indent=2))

    from .tokenizer import build_tokenizer

    tokenizer = build_tokenizer(header.metadata, str(path))
    tokenizer.save_pretrained(str(out))
    st = path.stat()
    source = {
        "source": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "converter_version": VERSION,
        "tensor_types": dict(collections.Counter(t.type_name for t in header.tensors)),
        "requantize_bits": requantize_bits,
        "requantized": requantized,
    }
    (out / "gguf_source.json").write_text(json.dumps(source, indent=2))
    (out / MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    say(f"converted {path.name} in {time.monotonic() - started:.1f} s")


def default_dtype(source_bf16: bool = False) -> Any:
    """The compute dtype for float tensors: float32 on the CPU backend (float16 arithmetic is
    many times slower there), else bfloat16 for files stored in BF16 and float16 otherwise."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return mx.float32
    return mx.bfloat16 if source_bf16 else mx.float16


def load(
    path: str | Path,
    *,
    cache_dir: str | Path,
    dtype: Any = None,
    requantize_bits: Optional[int] = DEFAULT_REQUANTIZE_BITS,
    dequantize: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> tuple[Any, Any]:
    """Load the GGUF file at `path` as `(model, tokenizer)`: an mlx-lm model and mlx-lm's
    TokenizerWrapper. Converts into `cache_dir` on first use (see `convert`).

    `dtype`: the dtype of every float tensor (dense weights, norms, quantization scales and
    biases); None picks `default_dtype()` for the current device. Packed weights stay packed
    unless `dequantize`: then every layer becomes dense in `dtype` (several times the memory;
    on CPU with an optimized BLAS, dense float32 prefill is far faster than quantized).
    Must run on the thread that will use the model (MLX streams belong to their thread).
    """
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    folder = convert(path, cache_dir, requantize_bits=requantize_bits, progress=progress)
    if dtype is None:
        source = json.loads((folder / "gguf_source.json").read_text())
        dtype = default_dtype("BF16" in source.get("tensor_types", {}))
    try:
        model, tokenizer = mlx_load(str(folder))[:2]
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ModelLoadError(f"{path}: converted model in {folder} does not load: {e}") from e
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, tokenizer
