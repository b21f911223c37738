"""appliance.engine.fusion on the real demo model: the fused model decodes the same tokens with the
same logits as mlx-lm's model, lists each weight once, frees the separate ones, runs each fused
matmul once a layer in mlx-lm's forward (and in other orders), and gives the right projections
whatever order and inputs they are called with; quantized too. The worker fuses unless
`fuse_projections: false`, and puts back groups whose parts a model leaves unused."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from appliance.engine.mlx_ext import fusion

pytestmark = pytest.mark.timeout(300)

STEPS = 40
# fp32 on the CPU: the fused matmul computes each output feature as the same dot product over the
# same input, so the logits come out bit-identical here (max difference 0.0 seen); the tolerance
# leaves room for a BLAS that blocks a wider matmul differently (reassociation: ~1e-6 relative),
# while a wrong split (a feature of another projection) moves them by whole units.
ATOL = 1e-5
SEPARATE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _load(path: Path) -> Any:
    from mlx_lm import load

    return load(str(path))[0]


@pytest.fixture(scope="module")
def prompt(demo_model_dir: Path) -> list[int]:
    from mlx_lm import load

    tokenizer = load(str(demo_model_dir))[1]
    return [
        int(t) for t in tokenizer.encode("The old bridge over the river, and the mill beyond it")
    ]


def _decode(model: Any, prompt: list[int]) -> tuple[list[int], mx.array, list[mx.array]]:
    """Greedy tokens of mlx-lm's plain loop, the prompt's logits, and each step's log-probs."""
    from mlx_lm.generate import generate_step

    logits = model(mx.array([prompt]))[0]
    tokens, logprobs = [], []
    for (token, lp), _ in zip(
        generate_step(mx.array(prompt), model, max_tokens=STEPS), range(STEPS), strict=False
    ):
        tokens.append(int(token))
        logprobs.append(lp)
    return tokens, logits, logprobs


def _assert_same_decode(want: Any, got: Any) -> None:
    tokens0, logits0, lps0 = want
    tokens1, logits1, lps1 = got
    assert len(tokens1) == STEPS
    assert tokens1 == tokens0
    assert mx.allclose(logits1, logits0, rtol=0, atol=ATOL).item(), float(
        mx.abs(logits1 - logits0).max()
    )
    worst = max(float(mx.abs(a - b).max()) for a, b in zip(lps0, lps1, strict=True))
    assert worst <= ATOL, worst


def _param_bytes(model: Any) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _parts(model: Any) -> list[fusion.FusedPart]:
    return [m for _, m in model.named_modules() if isinstance(m, fusion.FusedPart)]


@pytest.fixture(scope="module")
def plain(demo_model_dir: Path) -> Any:
    return _load(demo_model_dir)


@pytest.fixture(scope="module")
def fused(demo_model_dir: Path) -> Any:
    model = _load(demo_model_dir)
    assert fusion.fuse_projections(model) == 2 * len(model.layers)
    return model


def test_the_fused_model_decodes_the_same_tokens_and_logits(
    plain: Any, fused: Any, prompt: list[int]
) -> None:
    _assert_same_decode(_decode(plain, prompt), _decode(fused, prompt))


def test_the_fused_projections_take_the_fast_path_and_keep_nothing(
    fused: Any, prompt: list[int]
) -> None:
    parts = _parts(fused)
    assert len(parts) == 3 * len(fused.layers)  # k, v and up of each layer
    assert fusion.wasted_parts(fused) == 0
    _decode(fused, prompt)
    assert fusion.wasted_parts(fused) == 0
    for p in parts:  # every kept part was taken, and the input dropped with the last one
        assert p._shared.x is None and p._shared.parts == []


def test_each_weight_is_listed_once_in_order(plain: Any, fused: Any) -> None:
    before, after = dict(tree_flatten(plain.parameters())), dict(tree_flatten(fused.parameters()))
    assert _param_bytes(fused) == _param_bytes(plain)
    for name in after:
        assert not name.endswith(tuple(f"{p}.weight" for p in SEPARATE)), name
    assert len(after) == len(before) - 3 * len(plain.layers)
    for i in range(len(plain.layers)):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert not any(
            k.startswith((f"{attn}.k_proj", f"{attn}.v_proj", f"{mlp}.up_proj")) for k in after
        )
        qkv = mx.concatenate([before[f"{attn}.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
        assert mx.array_equal(after[f"{attn}.q_proj.fused.weight"], qkv).item()
        gu = mx.concatenate([before[f"{mlp}.{p}.weight"] for p in ("gate_proj", "up_proj")])
        assert mx.array_equal(after[f"{mlp}.gate_proj.fused.weight"], gu).item()


def test_the_separate_weights_are_freed(demo_model_dir: Path) -> None:
    model = _load(demo_model_dir)
    nbytes = _param_bytes(model)
    gc.collect()
    gc.disable()  # no reference cycle may hold the replaced arrays until a collection
    try:
        active = mx.get_active_memory()
        assert fusion.fuse_projections(model) == 2 * len(model.layers)
        assert mx.get_active_memory() == active  # the fused arrays in place of the separate ones
        assert _param_bytes(model) == nbytes
        del model
        assert mx.get_active_memory() == active - nbytes  # nothing of it left behind
    finally:
        gc.enable()


class _Block(nn.Module):
    """Projections as a model holds them (here with biases), called by the test in any order."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = make(64, 128), make(64, 32), make(64, 32)
        self.gate_proj, self.up_proj = make(64, 96), make(64, 96)


def _blocks(make: Any, quantize: dict[str, Any] | None) -> tuple[_Block, _Block]:
    """The same projections twice: as they are, and fused."""
    ref, fused = _Block(make), _Block(make)
    for b in (ref, fused):
        if quantize:
            nn.quantize(b, **quantize)
    fused.update(ref.parameters())  # the same arrays
    mx.eval(ref.parameters())
    assert fusion.fuse_projections(fused) == 2
    return ref, fused


@pytest.mark.parametrize(
    "quantize",
    [None, {"group_size": 32, "bits": 4}, {"mode": "mxfp4", "group_size": 32, "bits": 4}],
    ids=["linear", "affine-4bit", "mxfp4"],
)
def test_projections_are_right_in_any_order_and_on_any_input(
    quantize: dict[str, Any] | None,
) -> None:
    mx.random.seed(3)
    ref, fused = _blocks(lambda i, o: nn.Linear(i, o, bias=True), quantize)
    x, y = mx.random.normal((2, 3, 64)), mx.random.normal((2, 3, 64))

    def same(name: str, got: mx.array, inp: mx.array) -> None:
        want = getattr(ref, name)(inp)
        assert got.shape == want.shape
        assert mx.allclose(got, want, rtol=0, atol=1e-5).item(), name

    attn, mlp = fused.q_proj._shared, fused.gate_proj._shared
    # the order mlx-lm calls them in, then another order on one input: one run a group each
    for names in (
        ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
        ("v_proj", "q_proj", "k_proj", "up_proj", "gate_proj"),
    ):
        for n in names:
            same(n, getattr(fused, n)(x), x)
        assert fusion.wasted_parts(fused) == 0 and attn.x is None and mlp.x is None
    # other inputs: each call whose kept part is for another array runs the fused layer again
    same("v_proj", fused.v_proj(x), x)  # keeps q, k of x
    same("k_proj", fused.k_proj(y), y)  # q, k of x wasted; keeps q, v of y
    same("q_proj", fused.q_proj(x), x)  # q, v of y wasted; keeps k, v of x
    same("k_proj", fused.k_proj(x), x)  # taken
    same("k_proj", fused.k_proj(x), x)  # taken already: again (v of x wasted); keeps q, v
    assert attn.waste == 5 and sum(p is not None for p in attn.parts) == 2
    same("up_proj", fused.up_proj(y), y)
    same("up_proj", fused.up_proj(y), y)  # gate of y wasted
    same("gate_proj", fused.gate_proj(y), y)  # taken: nothing kept
    assert mlp.waste == 1 and mlp.x is None
    assert fusion.wasted_parts(fused) == 5 + 2 + 1
    # put back as separate layers (views of the fused arrays), both groups, still right
    assert fusion.unfuse_wasteful(fused) == 2
    for n in SEPARATE:
        assert type(fused[n]) is type(ref[n]), n
        same(n, fused[n](y), y)
    assert fusion.wasted_parts(fused) == 0


def test_layers_that_differ_are_left_alone() -> None:
    class Lora(nn.Linear):
        pass

    def block(**swap: Any) -> _Block:
        b = _Block(lambda i, o: nn.Linear(i, o, bias=False))
        for k, v in swap.items():
            setattr(b, k, v)
        return b

    quantized = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=8)
    cases = [
        block(
            k_proj=nn.Linear(48, 32, bias=False), up_proj=nn.Linear(64, 96, bias=True)
        ),  # width, bias
        block(v_proj=Lora(64, 32, bias=False), up_proj=quantized),  # a subclass, a mixed kind
        block(
            k_proj=nn.Linear(64, 32, bias=False).apply(lambda a: a.astype(mx.float16)),  # dtype
            gate_proj=nn.Sequential(nn.Linear(64, 96)),
        ),  # not a linear layer at all
    ]
    tied = block()
    tied.v_proj = tied.k_proj  # one layer under two names
    tied.up_proj = tied.gate_proj
    cases.append(tied)
    q4 = _Block(lambda i, o: nn.Linear(i, o, bias=False))
    nn.quantize(q4, group_size=32, bits=4)
    q4.k_proj = quantized  # 8 bits among 4-bit ones
    q4.up_proj = nn.QuantizedLinear(64, 96, bias=False, group_size=64, bits=4)  # another group size
    cases.append(q4)
    for b in cases:
        kinds = {n: id(b[n]) for n in SEPARATE}
        assert fusion.fuse_projections(b) == 0
        assert {n: id(b[n]) for n in SEPARATE} == kinds
    partial = block()
    del partial["v_proj"]  # q and k without v: only gate/up fuse
    assert fusion.fuse_projections(partial) == 1
    assert type(partial.q_proj) is nn.Linear and type(partial.up_proj) is fusion.FusedPart


def test_a_quantized_model_fuses_and_decodes_the_same(
    demo_model_dir: Path, prompt: list[int]
) -> None:
    plain_q, fused_q = _load(demo_model_dir), _load(demo_model_dir)
    for m in (plain_q, fused_q):
        nn.quantize(m, group_size=64, bits=4)
    nbytes = _param_bytes(fused_q)
    assert fusion.fuse_projections(fused_q) == 2 * len(fused_q.layers)
    assert isinstance(fused_q.layers[0].self_attn.q_proj.fused, nn.QuantizedLinear)
    assert _param_bytes(fused_q) == nbytes
    assert any(k.endswith("q_proj.fused.scales") for k, _ in tree_flatten(fused_q.parameters()))
    _assert_same_decode(_decode(plain_q, prompt), _decode(fused_q, prompt))
    assert fusion.wasted_parts(fused_q) == 0


@pytest.fixture
def engine_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="appliance.engine")
    yield caplog


def _worker_model(demo_model_dir: Path, fuse: bool, mlp: str = "llama") -> tuple[type, type, int]:
    """Load the demo model through a real ModelWorker (load, fusion, warm-up through the
    appliance's batching); the first layer's q_proj and gate_proj kinds and the parts wasted.
    `mlp`: "up_first" calls up_proj before gate_proj (as some architectures do); "gate_only"
    leaves up_proj unused (as gemma3n's KV-sharing layers leave k/v)."""
    from mlx_lm import load
    from mlx_lm.models.llama import MLP

    from appliance.config import ModelSpec
    from appliance.engine.worker import ModelWorker, batching

    class UpFirst(MLP):
        def __call__(self, x: mx.array) -> mx.array:
            up = self.up_proj(x)
            return self.down_proj(nn.silu(self.gate_proj(x)) * up)

    class GateOnly(MLP):
        def __call__(self, x: mx.array) -> mx.array:
            return self.down_proj(nn.silu(self.gate_proj(x)))

    def loader() -> tuple[Any, Any]:
        model, tokenizer = load(str(demo_model_dir))[:2]
        kind = {"llama": None, "up_first": UpFirst, "gate_only": GateOnly}[mlp]
        if kind is not None:
            for layer in model.layers:
                layer.mlp.__class__ = kind
        return model, tokenizer

    async def go() -> tuple[type, type, int]:
        w = ModelWorker(
            "demo",
            "builtin:demo",
            loader=loader,
            loop=asyncio.get_running_loop(),
            prompt_cache_bytes=0,
            **batching(ModelSpec(fuse_projections=fuse)),
        )
        await w.start()
        try:
            layer = w.model.layers[0]
            return (
                type(layer.self_attn.q_proj),
                type(layer.mlp.gate_proj),
                fusion.wasted_parts(w.model),
            )
        finally:
            w.stop()
            await asyncio.to_thread(w.join, 10.0)

    return asyncio.run(go())


def test_the_worker_fuses_by_default_and_not_when_told(
    demo_model_dir: Path, engine_log: Any
) -> None:
    head = fusion.FusedHead
    assert _worker_model(demo_model_dir, True) == (head, head, 0)  # warm-up: nothing wasted
    assert "model demo: fused q/k/v and gate/up projections in 8 groups" in engine_log.text
    assert "put back" not in engine_log.text
    engine_log.clear()
    assert _worker_model(demo_model_dir, False) == (nn.Linear, nn.Linear, 0)
    assert "fused q/k/v" not in engine_log.text
    assert "model demo: warmed up" in engine_log.text


def test_the_worker_keeps_fused_a_model_with_another_order_and_puts_back_unused_parts(
    demo_model_dir: Path,
    engine_log: Any,
) -> None:
    head = fusion.FusedHead
    assert _worker_model(demo_model_dir, True, mlp="up_first") == (head, head, 0)
    assert "put back" not in engine_log.text
    engine_log.clear()
    # up_proj never used: the MLP groups go back to separate layers, attention stays fused
    assert _worker_model(demo_model_dir, True, mlp="gate_only") == (head, nn.Linear, 0)
    assert "model demo: 4 of 8 fused groups put back as separate layers" in engine_log.text


def test_the_option_reaches_the_server(appliance_factory: Any) -> None:
    off = appliance_factory("logging.file=none", "+models.catalog.demo.fuse_projections=false")
    on = appliance_factory("logging.file=none", "+models.catalog.demo.engine_process=true")
    assert "model demo: warmed up" in off.log() and "fused q/k/v" not in off.log()
    assert "model demo: fused q/k/v and gate/up projections in 8 groups" in on.log()
