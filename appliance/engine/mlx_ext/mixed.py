"""One forward pass for a decode step and a prompt's prefill chunk together.

Beside decoding streams a long prompt is prefilled a chunk a step (the prefill budget). Run as a
forward pass of its own after the decode step's, a chunk pays a whole pass's fixed cost however
few tokens it holds: every layer's norms, projections and MLP launched once more. On two CPU
cores with the demo model a step with three decoding streams and a chunk of 2-8 tokens took
12-19 ms against 5-6 ms for the step alone, and the budget, which charges that cost to the
chunk's tokens, kept the chunks that small; on an H100 the fixed part was about 2.5 ms beside a
5.6 ms step.

`forward(model, inputs, cache, chunk, chunk_cache)` runs the decode step's tokens (B rows of one
token, `cache` the running batch's caches) and the chunk (P rows of L tokens, `chunk_cache` the
prompt batch's) through the model's layers as one sequence of B + P x L tokens: norms,
projections and MLP once over all of them; only attention runs per group, through the layer's
own attention module with the group's own cache and mask, exactly as the model's forward runs it.
The decode rows' logits come back as the model would return them; the chunk's hidden states are
dropped (the last layer's MLP runs on the decode rows only), as a prefill's are, and its caches
hold its keys and values as after `model(chunk, cache=chunk_cache)`.

It rebuilds the forward of the model families whose layers it knows (`supports`): mlx-lm 0.32's
llama (no sliding-window layers), qwen2 (one pipeline stage) and qwen3, every layer
`x + attn(norm(x))` then `h + mlp(norm(h))`. Other models keep the two passes.
"""

from __future__ import annotations

import importlib
from typing import Any

TARGETS = "mlx-lm 0.32 (models.llama, models.qwen2, models.qwen3: Model, TransformerBlock)"

_FAMILIES = ("llama", "qwen2", "qwen3")


def _family(model: Any) -> Any:
    """The mlx-lm module of the model's family if its forward is one this module rebuilds."""
    for name in _FAMILIES:
        try:
            module = importlib.import_module(f"mlx_lm.models.{name}")
        except ImportError:  # pragma: no cover - every mlx-lm 0.32 has these
            continue
        if type(model) is module.Model:
            return module
    return None


def usable() -> bool:
    """Whether the installed mlx-lm has the families' modules as `forward` reads them."""
    for name in _FAMILIES:
        try:
            module = importlib.import_module(f"mlx_lm.models.{name}")
        except ImportError:
            return False
        if not all(hasattr(module, a) for a in ("Model", "TransformerBlock")):
            return False
        if not callable(getattr(module, "create_attention_mask", None)):
            return False
    return True


def supports(model: Any) -> bool:
    """Whether `forward` can run this model: a known family whose every layer is that family's
    block, with no sliding-window layer and no pipeline split."""
    module = _family(model) if usable() else None
    if module is None:
        return False
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not layers or any(type(layer) is not module.TransformerBlock for layer in layers):
        return False
    if getattr(inner, "swa_idx", None) is not None:
        return False
    if getattr(inner, "pipeline_size", 1) != 1:
        return False
    needs = ("embed_tokens", "norm")
    return all(hasattr(inner, n) for n in needs) and hasattr(model, "args")


def forward(model: Any, inputs: Any, cache: list[Any], chunk: Any, chunk_cache: list[Any]) -> Any:
    """The logits of `model(inputs, cache=cache)` (inputs: B rows of one token), computed in one
    pass with the prefill of `chunk` (P rows of L tokens) into `chunk_cache`. The model must be
    one `supports` accepts."""
    import mlx.core as mx

    module = _family(model)
    inner = model.model
    h_dec = inner.embed_tokens(inputs)
    h_chunk = inner.embed_tokens(chunk)
    b, _, d = h_dec.shape
    p, n, _ = h_chunk.shape
    mask = module.create_attention_mask(h_dec, cache[0])
    chunk_mask = module.create_attention_mask(h_chunk, chunk_cache[0])
    h = mx.concatenate([h_dec.reshape(1, b, d), h_chunk.reshape(1, p * n, d)], axis=1)
    last = len(inner.layers) - 1
    for i, layer in enumerate(inner.layers):
        x = layer.input_layernorm(h)
        r = layer.self_attn(x[:, :b].reshape(b, 1, d), mask, cache[i])
        r_chunk = layer.self_attn(x[:, b:].reshape(p, n, d), chunk_mask, chunk_cache[i])
        if i == last:  # the chunk's own output feeds nothing: only its keys and values count
            h = h[:, :b] + r.reshape(1, b, d)
        else:
            h = h + mx.concatenate([r.reshape(1, b, d), r_chunk.reshape(1, p * n, d)], axis=1)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    out = inner.norm(h).reshape(b, 1, d)
    if model.args.tie_word_embeddings:
        return inner.embed_tokens.as_linear(out)
    return model.lm_head(out)
