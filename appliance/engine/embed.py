"""Embeddings from a loaded generative model: the mean-pooled final hidden state, L2-normalised.

The MLX work runs on the model's own generation thread (`ModelWorker.call`), between decode
steps, a few inputs per call so running streams keep their pace.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Sequence
from typing import Any, Union

from ..errors import InvalidRequest, PromptTooLong, RequestTimeout
from .service import Engine

Input = Union[str, Sequence[int]]
CHUNK = 8  # inputs per hop onto the generation thread


def _inner(model: Any) -> Any:
    """The transformer body (hidden states, not logits) of an mlx-lm model."""
    for path in (("model",), ("language_model", "model"), ("backbone",), ("transformer",)):
        obj = model
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None and callable(obj):
            return obj
    return None


def tokenize(tokenizer: Any, item: Input) -> list[int]:
    if isinstance(item, str):
        return list(tokenizer.encode(item))
    return list(item)


def _call(
    model: Any, tokenizer: Any, *, part: Sequence[Input], max_len: int, name: str
) -> tuple[list[list[float]], int]:
    return embed_batch(model, tokenizer, part, max_len, name)


def embed_batch(
    model: Any, tokenizer: Any, items: Sequence[Input], max_len: int, name: str
) -> tuple[list[list[float]], int]:
    """Runs on the generation thread: one vector per input and the tokens read."""
    import mlx.core as mx

    inner = _inner(model)
    if inner is None:
        raise InvalidRequest(f"model {name!r} has no transformer body to embed with", param="model")
    out: list[list[float]] = []
    total = 0
    for i, item in enumerate(items):
        tokens = tokenize(tokenizer, item)
        if not tokens:
            raise InvalidRequest(f"input[{i}] has no tokens", param="input")
        if len(tokens) > max_len:
            raise PromptTooLong(
                f"input[{i}] has {len(tokens)} tokens; model {name!r} takes at most {max_len}",
                param="input",
            )
        hidden = inner(mx.array([tokens]))  # (1, L, hidden)
        vec = mx.mean(hidden[0].astype(mx.float32), axis=0)
        vec = vec / mx.maximum(mx.linalg.norm(vec), 1e-12)
        mx.eval(vec)
        values: Any = vec.tolist()
        out.append([float(x) for x in values])
        total += len(tokens)
    return out, total


async def embed(engine: Engine, name: str, items: Sequence[Input]) -> tuple[list[list[float]], int]:
    """Vectors of `items` on catalog model `name` (loaded on first use), within admission."""
    worker = await engine.model(name)
    vocab = worker.vocab_size
    for i, item in enumerate(items):
        if not isinstance(item, str) and vocab and any(t < 0 or t >= vocab for t in item):
            raise InvalidRequest(f"input[{i}] has a token id outside 0..{vocab - 1}", param="input")
    max_len = engine.registry.spec(name).context_length
    await engine.admission.acquire()
    try:
        engine.registry.touch(name)
        vectors: list[list[float]] = []
        tokens = 0
        for start in range(0, len(items), CHUNK):
            part = items[start : start + CHUNK]
            fut = worker.call(functools.partial(_call, part=part, max_len=max_len, name=name))
            try:
                vecs, n = await asyncio.wait_for(
                    asyncio.wrap_future(fut), engine.limits.request_timeout_s
                )
            except asyncio.TimeoutError:
                raise RequestTimeout("the embedding ran past limits.request_timeout_s") from None
            vectors.extend(vecs)
            tokens += n
        return vectors, tokens
    finally:
        engine.admission.release()


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0
