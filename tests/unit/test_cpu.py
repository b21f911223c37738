"""The CPU backend's BLAS and weights (engine/cpu.py): finding a library, the gemv-forwarding
library's arithmetic, the preload environment, and how weights are planned and converted."""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from appliance.engine import cpu
from appliance.engine.paths import weight_sizes

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
FOUND = cpu.find_blas("auto")[0]
needs_blas = pytest.mark.skipif(
    FOUND is None, reason=f"no optimized BLAS installed ({cpu.INSTALL_HINT})"
)


@needs_blas
def test_auto_finds_an_installed_openblas_with_cblas_symbols() -> None:
    assert FOUND is not None
    assert cpu.blas_problem(FOUND) is None
    assert Path(FOUND) in cpu.candidates()
    lib, why = cpu.find_blas(FOUND)
    assert lib == FOUND and "names it" in why


def test_a_path_that_does_not_exist_is_refused_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "libblas.so.3"
    assert "does not exist" in (cpu.blas_problem(missing) or "")
    lib, why = cpu.find_blas(str(missing))
    assert lib is None and "does not exist" in why
    assert "not an absolute path" in (cpu.blas_problem("libblas.so.3") or "")


def test_a_file_that_is_not_a_library_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "libopenblas.so.0"
    fake.write_text("not a shared library\n")
    assert "not a shared library" in (cpu.blas_problem(fake) or "")
    assert cpu.find_blas(str(fake))[0] is None


def test_a_library_without_cblas_is_refused() -> None:
    name = ctypes.util.find_library("m")  # libm: a real shared library, no BLAS in it
    found = [p for p in (Path("/lib") / cpu._triplet(), Path("/usr/lib64")) if name]
    libm = next((d / str(name) for d in found if (d / str(name)).is_file()), None)
    if libm is None:
        pytest.skip("no libm to try")
    assert "does not export cblas_sgemm" in (cpu.blas_problem(libm) or "")


def test_bundled_keeps_the_wheels_blas() -> None:
    lib, why = cpu.find_blas("bundled")
    assert lib is None and "bundled" in why


def test_preload_env_puts_ours_first_and_replaces_an_earlier_arrangement() -> None:
    first = cpu.BlasChoice("auto", "/opt/a/libblas.so", "/c/fwd.so", "found")
    env = cpu._preload_env(first, {"LD_PRELOAD": "/x/libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/c/fwd.so /opt/a/libblas.so /x/libother.so"
    assert json.loads(env[cpu.MARKER_ENV])["library"] == "/opt/a/libblas.so"
    assert env["PATH"] == "/bin"
    bundled = cpu.BlasChoice("bundled", None, None, "kept")
    again = cpu._preload_env(bundled, env)
    assert again["LD_PRELOAD"] == "/x/libother.so"  # only what the earlier marker added goes
    assert json.loads(again[cpu.MARKER_ENV])["setting"] == "bundled"
    only_ours = {**env, "LD_PRELOAD": "/c/fwd.so /opt/a/libblas.so"}
    assert "LD_PRELOAD" not in cpu._preload_env(bundled, only_ours)


def test_this_process_was_not_started_as_the_appliance() -> None:
    assert not cpu.started_as_appliance()  # pytest: arrange() must never execute it again
    before = dict(os.environ)
    for setting in ("bundled", "auto"):
        choice = cpu.arrange(setting, gemv_forward=False)
        assert choice.library is None or choice.library == cpu.current().library
    assert dict(os.environ) == before  # nothing leaks into the processes tests start


def test_a_path_ld_preload_cannot_hold_is_refused(tmp_path: Path) -> None:
    assert "space or colon" in (cpu.blas_problem(tmp_path / "my blas" / "libblas.so.3") or "")
    assert "space or colon" in (cpu.blas_problem("/opt/a:b/libblas.so.3") or "")


def test_the_shim_is_left_out_when_its_cache_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be\n")
    shim, why = cpu.gemv_shim(blocker / "native")
    assert shim is None and "could not be built" in why


_EXEC_FAILS = """
import json, sys
from appliance.engine import cpu
sys.executable = "/nonexistent/python3"  # execve fails, as when the interpreter is gone
cpu.started_as_appliance = lambda: True
choice = cpu.arrange("auto", gemv_forward=False)
print(json.dumps(choice.as_dict()))
"""


@needs_blas
def test_when_executing_again_fails_the_process_goes_on_with_the_reason() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(cpu.MARKER_ENV, None)
    env.pop(cpu.PRELOAD_ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", _EXEC_FAILS], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    choice = json.loads(out.stdout.strip().splitlines()[-1])
    assert choice["library"] is None and "executing the process again failed" in choice["reason"]


# Every shape of one-row and one-column product MLX may hand to cblas_sgemm, both transposes
# of both operands, beta through addmm, against float64 numpy.
_PRODUCTS = """
import mlx.core as mx, numpy as np, json, os
from appliance.engine import cpu
cases = 0
for (m, n, k) in ((1, 1536, 576), (1, 300, 7), (3, 1536, 576), (5, 1, 7), (1, 1, 9), (64, 1, 33)):
    for ta in (0, 1):
        for tb in (0, 1):
            a = mx.random.normal((k, m) if ta else (m, k))
            b = mx.random.normal((n, k) if tb else (k, n))
            A, B = (a.T if ta else a), (b.T if tb else b)
            ref = np.array(A).astype(np.float64) @ np.array(B).astype(np.float64)
            assert np.allclose(np.array(A @ B), ref, atol=1e-3, rtol=1e-4), (m, n, k, ta, tb)
            cases += 1
a, b, c = mx.random.normal((1, 64)), mx.random.normal((64, 32)), mx.random.normal((1, 32))
want = 2 * np.array(c) + 0.5 * np.array(a) @ np.array(b)
assert np.allclose(np.array(mx.addmm(c, a, b, alpha=0.5, beta=2.0)), want, atol=1e-4)
assert np.allclose(np.array(mx.addmm(c.T, b.T, a.T, alpha=0.5, beta=2.0)), want.T, atol=1e-4)
print(json.dumps({"cases": cases, "blas": cpu.current().as_dict()}))
"""


@needs_blas
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_gemv_forwarding_computes_every_product_as_the_blas_does(tmp_path: Path) -> None:
    shim, why = cpu.gemv_shim(tmp_path)
    assert shim is not None, why
    assert cpu.gemv_shim(tmp_path) == (shim, "compiled earlier")
    choice = cpu.BlasChoice("auto", FOUND, shim, "test")
    env = cpu._preload_env(choice, {**os.environ, "PYTHONPATH": str(ROOT)})
    out = subprocess.run(
        [sys.executable, "-c", _PRODUCTS], env=env, capture_output=True, text=True, timeout=100
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cases"] == 24
    assert res["blas"]["library"] == FOUND and res["blas"]["gemv_forward"] == shim


# -- weights

_SIZES = cpu.WeightSizes(native=100, float32=150, dense=800, quantized=True)


def test_gpus_keep_weights_as_stored() -> None:
    plan = cpu.plan_weights("dense", _SIZES, on_cpu=False)
    assert not plan.float32 and not plan.dense and plan.bytes(_SIZES) == 100


def test_cpu_weights_modes() -> None:
    dense = cpu.plan_weights("dense", _SIZES, on_cpu=True)
    assert dense.float32 and dense.dense and dense.bytes(_SIZES) == 800
    stored = cpu.plan_weights("quantized", _SIZES, on_cpu=True)
    assert stored.float32 and not stored.dense and stored.bytes(_SIZES) == 150
    plain = cpu.WeightSizes(native=100, float32=200, dense=200, quantized=False)
    assert not cpu.plan_weights("dense", plain, on_cpu=True).dense


def test_auto_keeps_quantized_weights_without_an_optimized_blas() -> None:
    assert cpu.optimized_blas() is None  # pytest runs with the wheel's BLAS
    plan = cpu.plan_weights("auto", _SIZES, on_cpu=True, total_memory=10**12)
    assert plan.float32 and not plan.dense and "no optimized BLAS" in plan.reason


_AUTO = """
import json
from appliance.engine import cpu
sizes = cpu.WeightSizes(native=1, float32=2, dense=3 * 2**30, quantized=True)
out = {}
for total in (8 * 2**30, 24 * 2**30):
    p = cpu.plan_weights("auto", sizes, on_cpu=True, total_memory=total)
    out[str(total // 2**30)] = [p.dense, p.reason]
print(json.dumps(out))
"""


@needs_blas
def test_auto_goes_dense_with_an_optimized_blas_when_it_fits_a_quarter_of_memory() -> None:
    env = cpu._preload_env(
        cpu.BlasChoice("auto", FOUND, None, "test"), {**os.environ, "PYTHONPATH": str(ROOT)}
    )
    out = subprocess.run(
        [sys.executable, "-c", _AUTO], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["24"][0] is True and "optimized BLAS" in res["24"][1]
    assert res["8"][0] is False and "more than 25% of memory" in res["8"][1]


def test_weight_sizes_of_a_quantized_safetensors_folder(tmp_path: Path) -> None:
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"),
        {
            "l.weight": mx.zeros((8, 4), dtype=mx.uint32),  # 8 x 32 weights, 4 bits
            "l.scales": mx.zeros((8, 1), dtype=mx.float16),
            "l.biases": mx.zeros((8, 1), dtype=mx.float16),
            "n.weight": mx.zeros((8,), dtype=mx.bfloat16),
        },
    )
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"bits": 4}}))
    s = weight_sizes(tmp_path)
    assert s.quantized
    assert s.dense == 4 * (8 * 32 + 8)
    assert s.float32 == 8 * 4 * 4 + 4 * 8 + 4 * 8 + 4 * 8
    assert s.native == (tmp_path / "model.safetensors").stat().st_size


def test_weight_sizes_of_the_demo_model(demo_model_dir: Path) -> None:
    s = weight_sizes(demo_model_dir)
    assert not s.quantized and s.dense == s.float32 > 0


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 64)
        self.proj = nn.Linear(64, 128)
        self.norm = nn.RMSNorm(128)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.norm(self.proj(self.embed(ids)))


def test_to_cpu_compute_makes_quantized_bf16_layers_dense_float32() -> None:
    mx.random.seed(0)
    model = _Tiny()
    nn.quantize(model, group_size=32, bits=4)
    model.set_dtype(mx.bfloat16)
    ids = mx.array([[1, 5, 9]])
    model.set_dtype(mx.float32)
    want = np.array(model(ids))  # the quantized model with float32 scales
    model.set_dtype(mx.bfloat16)
    dense = cpu.to_cpu_compute(model, cpu.WeightPlan(True, True, "test"))
    assert isinstance(dense.proj, nn.Linear) and not isinstance(dense.proj, nn.QuantizedLinear)
    assert isinstance(dense.embed, nn.Embedding)
    assert not isinstance(dense.embed, nn.QuantizedEmbedding)
    for _, p in nn.utils.tree_flatten(dense.parameters()):
        assert p.dtype == mx.float32
    # bfloat16 scales, dequantized after the cast to float32: the same weights as the
    # quantized model computes with once its scales are float32
    np.testing.assert_allclose(np.array(dense(ids)), want, rtol=1e-4, atol=1e-4)


def test_to_cpu_compute_as_stored_keeps_packed_weights() -> None:
    model = _Tiny()
    nn.quantize(model, group_size=32, bits=4)
    model.set_dtype(mx.float16)
    kept = cpu.to_cpu_compute(model, cpu.WeightPlan(True, False, "test"))
    assert isinstance(kept.proj, nn.QuantizedLinear)
    assert kept.proj.weight.dtype == mx.uint32 and kept.proj.scales.dtype == mx.float32
    untouched = cpu.to_cpu_compute(model, cpu.WeightPlan(False, False, "gpu"))
    assert untouched is model
