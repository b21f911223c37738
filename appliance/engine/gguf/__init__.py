"""GGUF model files: inspect a header, convert to a cached MLX folder, load with mlx-lm.

from appliance.engine.gguf import default_cache_dir, inspect, load
info = inspect("model.Q4_K_M.gguf")          # header only: shapes, KV bytes per token
model, tokenizer = load("model.Q4_K_M.gguf", cache_dir=default_cache_dir())
"""

from .loader import (
    ARCHITECTURES,
    GGUFInfo,
    cache_folder,
    convert,
    default_cache_dir,
    default_dtype,
    inspect,
    load,
)

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
