"""The engine: model registry, loading and generation on MLX."""
