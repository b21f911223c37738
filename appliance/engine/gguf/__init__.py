"""GGUF model files: inspect a header, convert to a cached MLX folder, load with mlx-lm.

    from appliance.engine.gguf import inspect, load
    info = inspect("model.Q4_K_M.gguf")          # header only: shapes, KV bytes per token
    model, tokenizer = load("model.Q4_K_M.gguf", cache_dir=cache)
"""

from .loader import ARCHITECTURES, GGUFInfo, cache_folder, convert, default_dtype, inspect, load

__all__ = ["ARCHITECTURES", "GGUFInfo", "cache_folder", "convert", "default_dtype", "inspect", "load"]
