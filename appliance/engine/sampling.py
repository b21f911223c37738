"""From a request's sampling parameters to what mlx-lm's batch takes per sequence: a sampler
(None for greedy, so the batch shares one argmax) and logits processors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from .types import SamplingParams


def make_sampler(p: SamplingParams) -> Optional[Callable[[Any], Any]]:
    """None for greedy, else mlx-lm's sampler chain; a seeded request draws from its own key."""
    if p.greedy:
        return None
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    if p.seed is None:
        return mlx_make_sampler(temp=p.temperature, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k)
    # A seeded request draws from its own key, so its output repeats whatever else runs.
    state = {"key": mx.random.key(p.seed)}

    def seeded(logprobs: Any) -> Any:
        if 0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        key, sub = mx.random.split(state["key"])
        state["key"] = key
        return mx.random.categorical(logprobs * (1 / p.temperature), key=sub)

    return seeded


def make_processors(p: SamplingParams) -> list[Any]:
    """mlx-lm's logits processors for bias and penalties (none when the request asks none)."""
    if not (p.logit_bias or p.repetition_penalty or p.presence_penalty or p.frequency_penalty):
        return []
    from mlx_lm.sample_utils import make_logits_processors

    return list(
        make_logits_processors(
            logit_bias=dict(p.logit_bias) if p.logit_bias else None,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
        )
    )
