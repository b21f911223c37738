"""Fuse a loaded model's q/k/v projections, and its gate/up projections, into one matmul each.

One stream's decode step on a GPU is host-bound (MLX launching a few hundred kernels a step), and
fewer, wider matmuls cut it (`benchmarks/accelerator/step_cost.py`). This works
without rewriting a model's forward: the projections are replaced by stand-ins that share one fused
layer. Whichever stand-in is called first with an input array runs the fused layer on it, returns
its own part and keeps the others; a stand-in called with that very array (mlx-lm's models call q,
k, v, or gate, up, on the same `x`) takes its kept part; any other call runs the fused layer again.
The result is right whatever order and inputs a model uses (one that changed `x` in place between
two projections would get a stale part: no mlx-lm model does). A model that does not use every
projection of a group on one input (gemma3n's layers that share another's KV cache call q_proj
alone) wastes parts: `wasted_parts` counts them, and `unfuse_wasteful`, which the worker calls
after its warm-up, puts such groups back as separate layers.

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

__all__ = [
    "GROUPS",
    "FusedHead",
    "FusedPart",
    "fuse_projections",
    "unfuse_wasteful",
    "wasted_parts",
]

TARGETS = "mlx 0.32 (nn.Linear, nn.QuantizedLinear), mlx-lm 0.32 layer names"

# The projections fused together, each tuple in the order of the fused layer's output.
GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_KEYS: dict[type, set[str]] = {
    nn.Linear: {"weight", "bias"},
    nn.QuantizedLinear: {"weight", "scales", "biases", "bias"},
}
_QUANT = ("group_size", "bits", "mode")


class _Shared:
    """What a group's stand-ins share: a plain object, so nn.Module does not take it for a child
    (and its arrays are not listed twice among the model's parameters)."""

    __slots__ = ("head", "bounds", "x", "parts", "left", "waste")

    def __init__(self, bounds: list[tuple[int, int]]) -> None:
        self.head: Any = None  # weakref to the FusedHead: no cycle keeps the weights alive
        self.bounds = bounds  # output columns of each projection in the fused layer
        self.x: Optional[mx.array] = None  # the input of the last run ...
        self.parts: list[Optional[mx.array]] = []  # ... and its parts not taken yet
        self.left = 0  # how many of those
        self.waste = 0  # parts of earlier runs never taken

    @property
    def wasted(self) -> int:
        """Parts computed and not taken: earlier runs' and the last run's still kept."""
        return self.waste + self.left

    def drop(self) -> None:
        self.x = None
        self.parts = []
        self.left = 0

    def run(self, x: mx.array, i: int) -> mx.array:
        """Projection i of x: the part kept from the last run if that run was on this very array
        and the part is not taken yet, else a new run of the fused layer (whose other parts are
        kept for the other stand-ins)."""
        kept = self.parts[i] if self.x is x else None
        if kept is not None:
            self.parts[i] = None
            self.left -= 1
            if not self.left:
                self.drop()  # no activations held between calls
            return kept
        self.waste += self.left
        head = self.head()
        if head is None:
            raise RuntimeError("the fused projection's first stand-in is gone from the model")
        parts: list[Optional[mx.array]] = list(
            mx.split(head.fused(x), [b for _, b in self.bounds[:-1]], axis=-1)
        )
        y = parts[i]
        parts[i] = None
        self.x, self.parts, self.left = x, parts, len(parts) - 1
        assert y is not None
        return y


class FusedHead(nn.Module):
    """Stand-in for a group's first projection: owns the fused layer (`fused`)."""

    def __init__(self, fused: nn.Module, shared: _Shared) -> None:
        super().__init__()
        self.fused = fused
        self._shared = shared
        shared.head = weakref.ref(self)

    def __call__(self, x: mx.array) -> mx.array:
        return self._shared.run(x, 0)

    def _extra_repr(self) -> str:
        outputs = [b - a for a, b in self._shared.bounds]
        return f"fused of {len(self._shared.bounds)}, outputs {outputs}"


class FusedPart(nn.Module):
    """Stand-in for a later projection of a group (it reaches the fused layer through the head)."""

    def __init__(self, shared: _Shared, index: int) -> None:
        super().__init__()
        self._shared = shared
        self._index = index

    def __call__(self, x: mx.array) -> mx.array:
        return self._shared.run(x, self._index)

    def _extra_repr(self) -> str:
        a, b = self._shared.bounds[self._index]
        return f"part {self._index} of a fused projection, outputs {b - a}"


def _make(like: nn.Module, arrays: dict[str, mx.array]) -> nn.Module:
    """A layer of `like`'s kind (Linear or QuantizedLinear, same quantization) holding `arrays`."""
    layer: nn.Module
    if type(like) is nn.QuantizedLinear:  # a stub of one output whose arrays are replaced
        in_dims = like["weight"].shape[1] * 32 // like.bits
        layer = nn.QuantizedLinear(
            in_dims, 1, "bias" in arrays, like.group_size, like.bits, mode=like.mode
        )
    else:
        layer = nn.Linear(1, 1, bias="bias" in arrays)
    for k, v in arrays.items():
        setattr(layer, k, v)
    return layer


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
    return _make(first, arrays), bounds


def usable() -> bool:
    """Whether MLX's linear layers hold what fusion copies (else the model stays unfused)."""
    try:
        q = nn.QuantizedLinear(64, 32, bias=False)
    except Exception:
        return False
    return all(hasattr(q, a) for a in ("weight", "scales", *_QUANT)) and hasattr(
        nn.Linear(4, 4), "weight"
    )


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


def wasted_parts(model: nn.Module) -> int:
    """Parts of fused runs that no stand-in took (computed for nothing), including those still
    kept: 0 after any forward of a model that calls each projection of a group once on one input,
    in any order; more for one that skips some (gemma3n's layers that share another's KV cache
    call q_proj alone) or calls them on different inputs."""
    heads = [m for _, m in model.named_modules() if isinstance(m, FusedHead)]
    return sum(h._shared.wasted for h in heads)


def unfuse_wasteful(model: nn.Module) -> int:
    """Put back as separate layers (views of the fused arrays: no copy) each group that wasted
    parts so far; returns how many. The worker calls it after the warm-up."""
    done = 0
    for _, parent in list(model.named_modules()):
        for group in GROUPS:
            head = parent.get(group[0]) if isinstance(parent, dict) else None
            if not isinstance(head, FusedHead):
                continue
            s = head._shared
            if not s.wasted:
                continue
            arrays = {k: v for k, v in head.fused.items() if isinstance(v, mx.array)}
            for name, (a, b) in zip(group, s.bounds, strict=True):
                part = {k: v[a:b] for k, v in arrays.items()}
                mx.eval(part)
                setattr(parent, name, _make(head.fused, part))
            s.drop()
            done += 1
    return done
