"""Where a catalog model's files are, and what they will cost in memory.

A catalog `path` is a local folder, a hub id already in the local Hugging Face cache, or a
built-in model; nothing is ever downloaded here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..config import ModelSpec
from ..errors import ModelLoadError
from .cpu import WeightSizes
from .governor import KVShape

DEMO_PREFIX = "builtin:"


BUILTINS = ("builtin:demo", "builtin:smollm2")


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and path.is_file()


def resolve_path(
    spec: ModelSpec, builtin_dir: Optional[str], *, allow_downloads: bool = False
) -> Path:
    """A catalog path to a local model: a folder (MLX or Hugging Face layout) or a .gguf file.
    Builds the demo model, finds SmolLM2's file and cached hub ids.

    A hub id missing from the local cache fails at once, unless `allow_downloads`
    (models.allow_downloads) lets it be fetched now.
    """
    if spec.path.startswith(DEMO_PREFIX):
        if spec.path == "builtin:smollm2":
            from .builtin import smollm2_path

            return smollm2_path(builtin_dir)
        if spec.path != "builtin:demo":
            raise ModelLoadError(
                f"unknown builtin model {spec.path!r}; allowed: {', '.join(BUILTINS)}"
            )
        from .demo import ensure_demo_model

        return ensure_demo_model(builtin_dir, shape=spec.demo_shape)
    local = Path(spec.path).expanduser()
    if local.is_dir() or is_gguf(local):
        return local
    if local.suffix.lower() == ".gguf":
        raise ModelLoadError(f"model file {spec.path!r} does not exist", param="path")
    if local.is_absolute() or spec.path.startswith(("~", ".")) or spec.path.count("/") != 1:
        raise ModelLoadError(f"model folder {spec.path!r} does not exist", param="path")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.path, local_files_only=not allow_downloads))
    except Exception:
        raise ModelLoadError(
            f"{spec.path!r} is not a local folder and is not in the local Hugging Face cache; "
            "the appliance does not download models unless models.allow_downloads is true: "
            "fetch it first or give a folder",
            param="path",
        ) from None


def estimate_bytes(path: Path, spec: ModelSpec, weights: Optional[int] = None) -> int:
    """Weights as loaded (`weights`, else as stored) plus the KV cache of one full context."""
    if weights is None:
        weights = weight_sizes(path).native
    return weights + kv_bytes_per_token(path) * spec.context_length


_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_INT_BYTES = {"U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8}


def _safetensors_header(file: Path) -> dict[str, Any]:
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 1 << 28:
            raise ValueError(f"{file}: not a safetensors file")
        header = json.loads(f.read(size))
    return {k: v for k, v in header.items() if k != "__metadata__"}


def weight_sizes(path: Path) -> WeightSizes:
    """A model's weight bytes held as stored (16-bit floats on a GPU), with floats in float32
    (the CPU backend), and all dense in float32, from the GGUF header or the safetensors
    headers (no tensor data is read)."""
    if is_gguf(path):
        from . import gguf
        from .mlx_ext.cuda import on_cuda

        info = gguf.inspect(path)
        if info.problem:
            raise ModelLoadError(f"{path}: {info.problem}")
        return WeightSizes(
            native=info.memory_bytes(float_bytes=2 if on_cuda() else 4),
            float32=info.memory_bytes(float_bytes=4),
            dense=info.memory_bytes(float_bytes=4, dequantize=True),
            quantized=any(t not in ("F32", "F16", "BF16", "F64") for t, _ in info.tensor_sizes),
        )
    files = sorted(path.glob("*.safetensors"))
    native = sum(f.stat().st_size for f in files)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    quant = config.get("quantization") or config.get("quantization_config") or {}
    float32 = dense = 0
    quantized = False
    try:
        for f in files:
            header = _safetensors_header(f)
            for name, t in header.items():
                n = 1
                for d in t["shape"]:
                    n *= int(d)
                dtype = t["dtype"]
                if dtype in _FLOAT_BYTES:
                    float32 += 4 * n
                    module = name.rsplit(".", 1)[0]
                    packed = header.get(f"{module}.weight", {}).get("dtype") in _INT_BYTES
                    if not (name.endswith((".scales", ".biases")) and packed):
                        dense += 4 * n
                    continue
                float32 += _INT_BYTES.get(dtype, 4) * n
                module = name.rsplit(".", 1)[0]
                if name.endswith(".weight") and f"{module}.scales" in header:
                    quantized = True
                    own = quant.get(module)
                    layer: dict[str, Any] = own if isinstance(own, dict) else quant
                    bits = int(layer.get("bits", quant.get("bits", 4)) or 4)
                    dense += 4 * n * (_INT_BYTES.get(dtype, 4) * 8 // bits)
                else:
                    dense += 4 * n
    except (OSError, ValueError, KeyError, TypeError):
        return WeightSizes(native, 2 * native, 2 * native, bool(quant))
    return WeightSizes(native, float32 or native, dense or native, quantized)


def kv_bytes_per_token(path: Path) -> int:
    """KV cache bytes per token (2 * layers * kv_heads * head_dim * dtype), 0 when unknown."""
    shape = kv_shape(path)
    return shape.bytes_per_token() if shape is not None else 0


def kv_shape(path: Path) -> Optional[KVShape]:
    """The shape of one token's keys and values (config.json, or a GGUF file's header); None
    when unknown."""
    if is_gguf(path):
        from . import gguf

        info = gguf.inspect(path)
        if not (info.n_layers and info.n_kv_heads and info.head_dim):
            return None
        float_bytes = gguf.default_dtype().size  # what the loaded model computes in
        return KVShape(info.n_layers, info.n_kv_heads, info.head_dim, float_bytes)
    try:
        cfg = json.loads((path / "config.json").read_text())
        text_cfg = cfg.get("text_config", cfg)
        layers = int(text_cfg["num_hidden_layers"])
        heads = int(text_cfg["num_attention_heads"])
        kv_heads = int(text_cfg.get("num_key_value_heads", heads))
        head_dim = int(text_cfg.get("head_dim") or text_cfg["hidden_size"] // heads)
        dtype_bytes = 2 if str(text_cfg.get("torch_dtype", "bfloat16")) != "float32" else 4
        from .cpu import mlx_on_cpu

        if mlx_on_cpu():  # every model computes in float32 there (cpu.to_cpu_compute)
            dtype_bytes = 4
        return KVShape(layers, kv_heads, head_dim, dtype_bytes)
    except (OSError, KeyError, ValueError, TypeError, ZeroDivisionError):
        return None
