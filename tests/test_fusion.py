"""appliance.engine.fusion on the real demo model: the fused model decodes the same tokens with the
same logits as mlx-lm's model, lists each weight once, frees the separate ones, takes the fast
path in mlx-lm's forward, and computes the right slice whatever order the projections are called
in; quantized too. The worker fuses unless `fuse_projections: false`."""

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

from appliance.engine import fusion

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
    return [int(t) for t in tokenizer.encode("The old bridge over the river, and the mill beyond it")]


def _decode(model: Any, prompt: list[int]) -> tuple[list[int], mx.array, list[mx.array]]:
    """Greedy tokens of mlx-lm's plain loop, the prompt's logits, and each step's log-probs."""
    from mlx_lm.generate import generate_step

    logits = model(mx.array([prompt]))[0]
    tokens, logprobs = [], []
    for (token, lp), _ in zip(generate_step(mx.array(prompt), model, max_tokens=STEPS), range(STEPS), strict=False):
        tokens.append(int(token))
        logprobs.append(lp)
    return tokens, logits, logprobs


def _assert_same_decode(want: Any, got: Any) -> None:
    tokens0, logits0, lps0 = want
    tokens1, logits1, lps1 = got
    assert len(tokens1) == STEPS
    assert tokens1 == tokens0
    assert mx.allclose(logits1, logits0, rtol=0, atol=ATOL).item(), float(mx.abs(logits1 - logits0).max())
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


def test_the_fused_model_decodes_the_same_tokens_and_logits(plain: Any, fused: Any, prompt: list[int]) -> None:
    _assert_same_decode(_decode(plain, prompt), _decode(fused, prompt))


def test_the_fused_projections_take_the_fast_path_and_keep_nothing(fused: Any, prompt: list[int]) -> None:
    parts = _parts(fused)
    assert len(parts) == 3 * len(fused.layers)  # k, v and up of each layer
    before = fusion.fallback_calls(fused)
    _decode(fused, prompt)
    assert fusion.fallback_calls(fused) == before == 0
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
        assert not any(k.startswith((f"{attn}.k_proj", f"{attn}.v_proj", f"{mlp}.up_proj")) for k in after)
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


@pytest.mark.parametrize("quantize", [None, {"group_size": 32, "bits": 4}, {"mode": "mxfp4", "group_size": 32, "bits": 4}],
                         ids=["linear", "affine-4bit", "mxfp4"])
def test_a_projection_called_out_of_order_or_on_another_input_computes_its_own_slice(
    quantize: dict[str, Any] | None,
) -> None:
    mx.random.seed(3)
    ref, fused = _blocks(lambda i, o: nn.Linear(i, o, bias=True), quantize)
    x, y = mx.random.normal((2, 3, 64)), mx.random.normal((2, 3, 64))

    def same(name: str, got: mx.array, inp: mx.array) -> None:
        want = getattr(ref, name)(inp)
        assert got.shape == want.shape
        assert mx.allclose(got, want, rtol=0, atol=1e-5).item(), name

    parts = {n: getattr(fused, n) for n in ("k_proj", "v_proj", "up_proj")}
    # the order mlx-lm calls them in: the fast path
    same("q_proj", fused.q_proj(x), x)
    same("k_proj", fused.k_proj(x), x)
    same("v_proj", fused.v_proj(x), x)
    same("gate_proj", fused.gate_proj(x), x)
    same("up_proj", fused.up_proj(x), x)
    assert all(p.fallbacks == 0 for p in parts.values())
    # a later projection first, twice on the same input, on another input than the head's
    same("v_proj", fused.v_proj(x), x)
    same("k_proj", fused.k_proj(y), y)
    same("q_proj", fused.q_proj(x), x)
    same("k_proj", fused.k_proj(y), y)  # the head's input was x
    same("v_proj", fused.v_proj(x), x)  # dropped with the mismatch: computed again, still right
    same("up_proj", fused.up_proj(y), y)
    same("gate_proj", fused.gate_proj(y), y)
    same("up_proj", fused.up_proj(y), y)  # the fast path again
    same("up_proj", fused.up_proj(y), y)  # taken already: its own slice
    assert [parts[n].fallbacks for n in ("k_proj", "v_proj", "up_proj")] == [2, 2, 2]
    assert fusion.fallback_calls(fused) == 6


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
        block(k_proj=nn.Linear(48, 32, bias=False), up_proj=nn.Linear(64, 96, bias=True)),  # width, bias
        block(v_proj=Lora(64, 32, bias=False), up_proj=quantized),  # a subclass, a mixed kind
        block(k_proj=nn.Linear(64, 32, bias=False).apply(lambda a: a.astype(mx.float16)),  # dtype
              gate_proj=nn.Sequential(nn.Linear(64, 96))),  # not a linear layer at all
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


def test_a_quantized_model_fuses_and_decodes_the_same(demo_model_dir: Path, prompt: list[int]) -> None:
    plain_q, fused_q = _load(demo_model_dir), _load(demo_model_dir)
    for m in (plain_q, fused_q):
        nn.quantize(m, group_size=64, bits=4)
    nbytes = _param_bytes(fused_q)
    assert fusion.fuse_projections(fused_q) == 2 * len(fused_q.layers)
    assert isinstance(fused_q.layers[0].self_attn.q_proj.fused, nn.QuantizedLinear)
    assert _param_bytes(fused_q) == nbytes
    assert any(k.endswith("q_proj.fused.scales") for k, _ in tree_flatten(fused_q.parameters()))
    _assert_same_decode(_decode(plain_q, prompt), _decode(fused_q, prompt))
    assert fusion.fallback_calls(fused_q) == 0


@pytest.fixture
def engine_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="appliance.engine")
    yield caplog


def _worker_model(demo_model_dir: Path, fuse: bool, up_first: bool = False) -> tuple[type, int]:
    """Load the demo model through a real ModelWorker (load, fusion, warm-up through the
    appliance's batching); the first layer's q_proj kind and the fallback calls of warm-up.
    `up_first`: its MLPs call up_proj before gate_proj, as some architectures might."""
    from mlx_lm import load
    from mlx_lm.models.llama import MLP

    from appliance.config import ModelSpec
    from appliance.engine.worker import ModelWorker, batching

    class UpFirst(MLP):
        def __call__(self, x: mx.array) -> mx.array:
            up = self.up_proj(x)
            return self.down_proj(nn.silu(self.gate_proj(x)) * up)

    def loader() -> tuple[Any, Any]:
        model, tokenizer = load(str(demo_model_dir))[:2]
        if up_first:
            for layer in model.layers:
                layer.mlp.__class__ = UpFirst
        return model, tokenizer

    async def go() -> tuple[type, int]:
        w = ModelWorker("demo", "builtin:demo", loader=loader, loop=asyncio.get_running_loop(),
                        prompt_cache_bytes=0, **batching(ModelSpec(fuse_projections=fuse)))
        await w.start()
        try:
            return type(w.model.layers[0].self_attn.q_proj), fusion.fallback_calls(w.model)
        finally:
            w.stop()
            await asyncio.to_thread(w.join, 10.0)

    return asyncio.run(go())


def test_the_worker_fuses_by_default_and_not_when_told(demo_model_dir: Path, engine_log: Any) -> None:
    assert _worker_model(demo_model_dir, True) == (fusion.FusedHead, 0)  # warm-up: the fast path
    assert "model demo: fused q/k/v and gate/up projections in 8 groups" in engine_log.text
    assert "computed their own slice" not in engine_log.text
    engine_log.clear()
    assert _worker_model(demo_model_dir, False) == (nn.Linear, 0)
    assert "fused q/k/v" not in engine_log.text
    assert "model demo: warmed up" in engine_log.text


def test_the_worker_warns_of_a_model_that_calls_its_projections_in_another_order(
    demo_model_dir: Path, engine_log: Any,
) -> None:
    kind, slow = _worker_model(demo_model_dir, True, up_first=True)
    assert kind is fusion.FusedHead and slow > 0
    assert f"model demo: {slow} calls of fused projections in warm-up computed their own slice" in engine_log.text


def test_the_option_reaches_the_server(appliance_factory: Any) -> None:
    off = appliance_factory("logging.file=none", "+models.catalog.demo.fuse_projections=false")
    on = appliance_factory("logging.file=none", "+models.catalog.demo.engine_process=true")
    assert "model demo: warmed up" in off.log() and "fused q/k/v" not in off.log()
    assert "model demo: fused q/k/v and gate/up projections in 8 groups" in on.log()
