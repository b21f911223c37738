"""Fuse a loaded model's q/k/v projections, and its gate/up projections, into one matmul each.

One stream's decode step on a GPU is host-bound (MLX launching a few hundred kernels a step), and
fewer, wider matmuls cut it (BENCHMARKS.md, `scripts/accelerator/step_cost.py`). This works on any
architecture without rewriting its forward: the projections are replaced by stand-ins that share
one fused layer. The first projection's stand-in runs it and splits the output, keeping the other
parts with the input array; the others' stand-ins return their part when called with that very
array (mlx-lm's models call q, k, v, or gate, up, on the same `x`), and otherwise compute their
own slice of the fused weights, so the result is right in any order.

Only plain `nn.Linear` and `nn.QuantizedLinear` layers of one shape of input, dtype, bias and
quantization are fused; anything else (sharded layers of a distributed model, LoRA, ...) is left
as it is. The model's parameters list each fused array once, under the first stand-in
(`q_proj.fused.weight`), so a fused model no longer loads a checkpoint of the unfused layout.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

__all__ = ["GROUPS", "FusedHead", "FusedPart", "fallback_calls", "fuse_projections"]

# The projections fused together, each tuple in the order of the fused layer's output.
GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_KEYS: dict[type, set[str]] = {nn.Linear: {"weight", "bias"}, nn.QuantizedLinear: {"weight", "scales", "biases", "bias"}}
_QUANT = ("group_size", "bits", "mode")


class _Shared:
    """What a group's stand-ins share: a plain object, so nn.Module does not take it for a child
    (and its arrays are not listed twice among the model's parameters)."""

    __slots__ = ("head", "bounds", "x", "parts")

    def __init__(self, bounds: list[tuple[int, int]]) -> None:
        self.head: Any = None  # weakref to the FusedHead: no cycle keeps the weights alive
        self.bounds = bounds  # output columns of each projection in the fused layer
        self.x: Optional[mx.array] = None  # the input of the head's last call ...
        self.parts: list[Optional[mx.array]] = []  # ... and the parts of it not taken yet

    def drop(self) -> None:
        self.x = None
        self.parts = []


class FusedHead(nn.Module):
    """Stand-in for a group's first projection: owns the fused layer (`fused`), runs it, returns
    its own part and keeps the others for the group's other stand-ins."""

    def __init__(self, fused: nn.Module, shared: _Shared) -> None:
        super().__init__()
        self.fused = fused
        self._shared = shared
        shared.head = weakref.ref(self)

    def __call__(self, x: mx.array) -> mx.array:
        s = self._shared
        parts = mx.split(self.fused(x), [b for _, b in s.bounds[:-1]], axis=-1)
        s.x, s.parts = x, list(parts[1:])
        return parts[0]

    def _extra_repr(self) -> str:
        return f"fused of {len(self._shared.bounds)}, outputs {[b - a for a, b in self._shared.bounds]}"


class FusedPart(nn.Module):
    """Stand-in for a later projection of a group: the head's kept part when called with the head's
    input, else its own slice of the fused weights (`fallbacks` counts those calls)."""

    def __init__(self, shared: _Shared, index: int) -> None:
        super().__init__()
        self._shared = shared
        self._index = index
        self.fallbacks = 0

    def __call__(self, x: mx.array) -> mx.array:
        s = self._shared
        i = self._index - 1
        y = s.parts[i] if s.x is x else None
        if y is not None:
            s.parts[i] = None
            if not any(p is not None for p in s.parts):
                s.drop()  # no activations held between calls
            return y
        self.fallbacks += 1
        if s.x is not None and s.x is not x:
            s.drop()  # another input: rather than hold what was kept, compute it again if asked
        head = s.head()
        if head is None:
            raise RuntimeError("the fused projection's first stand-in is gone from the model")
        a, b = s.bounds[self._index]
        return _rows(head.fused, a, b, x)

    def _extra_repr(self) -> str:
        a, b = self._shared.bounds[self._index]
        return f"part {self._index} of a fused projection, outputs {b - a}"


def _rows(layer: nn.Module, a: int, b: int, x: mx.array) -> mx.array:
    """Output features a:b of `layer` (a Linear or QuantizedLinear) on x, as the layer computes
    them, from views of its arrays."""
    if isinstance(layer, nn.QuantizedLinear):
        biases = layer.get("biases")
        y = mx.quantized_matmul(
            x,
            layer["weight"][a:b],
            scales=layer["scales"][a:b],
            biases=None if biases is None else biases[a:b],
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
        return y + layer["bias"][a:b] if "bias" in layer else y
    w = layer["weight"][a:b]
    if "bias" in layer:
        return mx.addmm(layer["bias"][a:b], x, w.T)
    return x @ w.T


def _fusable(layers: list[Any]) -> bool:
    first = layers[0]
    kind = type(first)
    if kind not in _KEYS or any(type(m) is not kind for m in layers):  # subclasses may differ
        return False
    keys = set(first.keys())
    if not keys <= _KEYS[kind] or "weight" not in keys:
        return False
    for m in layers:
        if set(m.keys()) != keys or m["weight"].ndim != 2:
            return False
        if m["weight"].shape[1] != first["weight"].shape[1]:
            return False
        if any(m[k].dtype != first[k].dtype for k in keys):
            return False
        if kind is nn.QuantizedLinear and any(getattr(m, a) != getattr(first, a) for a in _QUANT):
            return False
    return True


def _fuse(layers: list[Any]) -> tuple[nn.Module, list[tuple[int, int]]]:
    first = layers[0]
    arrays = {k: mx.concatenate([m[k] for m in layers], axis=0) for k in first.keys()}
    mx.eval(arrays)  # paid now, at load; the separate arrays go when the layers do
    rows = [int(m["weight"].shape[0]) for m in layers]
    bounds, at = [], 0
    for n in rows:
        bounds.append((at, at + n))
        at += n
    fused: nn.Module
    if type(first) is nn.QuantizedLinear:  # a stub of one output whose arrays are replaced
        in_dims = first["weight"].shape[1] * 32 // first.bits
        fused = nn.QuantizedLinear(in_dims, 1, "bias" in arrays, first.group_size, first.bits, mode=first.mode)
    else:
        fused = nn.Linear(1, 1, bias="bias" in arrays)
    for k, v in arrays.items():
        setattr(fused, k, v)
    return fused, bounds


def fuse_projections(model: nn.Module) -> int:
    """Replace each module's q/k/v and gate/up projections by stand-ins over one fused layer;
    returns how many groups were fused. Call once, before the model runs."""
    names = {n for g in GROUPS for n in g}
    # Parents only: a list of every module would keep the replaced layers (and weights) alive.
    parents = [m for _, m in model.named_modules() if any(n in m for n in names)]
    uses = Counter(id(m) for _, m in model.named_modules())  # one reached twice (tied): left alone
    done = 0
    for p in parents:
        for group in GROUPS:
            layers = [p.get(n) for n in group]
            if any(m is None for m in layers) or any(uses.get(id(m), 0) != 1 for m in layers):
                continue
            if not _fusable(layers):
                continue
            fused, bounds = _fuse(layers)
            del layers
            shared = _Shared(bounds)
            setattr(p, group[0], FusedHead(fused, shared))
            for i, n in enumerate(group[1:], 1):
                setattr(p, n, FusedPart(shared, i))
            done += 1
    if done:
        mx.clear_cache()  # the separate weights' buffers, back to the system
    return done


def fallback_calls(model: nn.Module) -> int:
    """Calls of the model's fused stand-ins so far that computed their own slice (not the fast
    path): non-zero after a forward when the model calls its projections in another order."""
    return sum(m.fallbacks for _, m in model.named_modules() if isinstance(m, FusedPart))
