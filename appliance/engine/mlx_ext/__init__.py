"""Every patch of, or reach into, mlx / mlx-lm (and transformers) internals: one module each.

Each module names the versions it was written against (`TARGETS`) and has a `usable()` guard; where
the internals are not what it expects, the engine falls back to the library's own path (with a
log line) instead of failing. Nothing here is imported at the package's import.
"""
