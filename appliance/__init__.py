"""The appliance: a declarative, config-driven LLM server on MLX."""

__version__ = "0.1.0"
