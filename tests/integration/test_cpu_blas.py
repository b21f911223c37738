"""A started appliance arranges its own BLAS (engine.cpu_blas): with auto it runs on the OpenBLAS
of this machine, preloaded by executing itself again with argv and overrides intact; bundled
keeps the wheel's; and on SmolLM2 dense and quantized weights both answer.

Real `python -m appliance` processes; the BLAS in use is read from the process's own memory
map, not only from what it reports."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from appliance.engine import cpu

from ..conftest import NOT_ARRANGED

pytestmark = pytest.mark.timeout(180)

ADMIN = "cpu-admin-key"
FOUND = cpu.find_blas("auto")[0]
needs_blas = pytest.mark.skipif(
    FOUND is None or not cpu.mlx_on_cpu(),
    reason=f"MLX not on the CPU, or no optimized BLAS installed ({cpu.INSTALL_HINT})",
)


def _health(app) -> dict:
    r = httpx.get(app.url + "/admin/health", headers={"Authorization": f"Bearer {ADMIN}"})
    r.raise_for_status()
    return dict(r.json())


def _blas_line(app) -> dict:
    return dict(json.loads(next(x for x in app.log().splitlines() if "CPU BLAS:" in x)))


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@needs_blas
def test_auto_preloads_the_installed_blas_and_keeps_argv(appliance_factory) -> None:
    # Started as from a shell: it finds the BLAS and executes itself again.
    app = appliance_factory("limits.max_running=3", env={**NOT_ARRANGED, "LMX_ADMIN_KEY": ADMIN})
    # The same process (execve keeps the PID), answering on the port its argv named.
    maps = _maps(app.proc.pid)
    assert str(Path(FOUND).resolve()) in maps
    blas = _health(app)["cpu_blas"]
    assert blas["setting"] == "auto" and blas["library"] == FOUND and blas["on_cpu"]
    assert "auto found it" in blas["reason"]
    if blas["gemv_forward"]:
        assert blas["gemv_forward"] in maps
    line = _blas_line(app)
    assert FOUND in line["event"] and line["level"] == "INFO"
    cfg = httpx.get(app.url + "/admin/config", headers={"Authorization": f"Bearer {ADMIN}"})
    assert cfg.json()["limits"]["max_running"] == 3  # overrides survived the second start
    assert app.log().count("CPU BLAS:") == 1  # executed itself once, not in a loop
    r = httpx.post(
        app.url + "/v1/completions",
        json={"model": "demo", "prompt": "Hello", "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


@needs_blas
def test_bundled_does_not_preload(appliance_factory) -> None:
    app = appliance_factory("engine.cpu_blas=bundled", env={**NOT_ARRANGED, "LMX_ADMIN_KEY": ADMIN})
    assert str(Path(FOUND).resolve()) not in _maps(app.proc.pid)
    blas = _health(app)["cpu_blas"]
    assert blas["setting"] == "bundled" and blas["library"] is None
    assert blas["gemv_forward"] is None


@needs_blas
def test_bundled_drops_a_blas_an_outer_appliance_preloaded(appliance_factory) -> None:
    # An appliance started from a process that already ran under the arrangement (its
    # marker and LD_PRELOAD inherited) still runs with what its own config says.
    inherited = cpu._preload_env(cpu.BlasChoice("auto", FOUND, None, "outer"), {})
    app = appliance_factory("engine.cpu_blas=bundled", env={**inherited, "LMX_ADMIN_KEY": ADMIN})
    assert str(Path(FOUND).resolve()) not in _maps(app.proc.pid)
    assert _health(app)["cpu_blas"]["library"] is None


def test_a_path_that_cannot_be_used_warns_and_runs_on_the_wheels_blas(
    appliance_factory, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "libblas.so.3"
    app = appliance_factory(
        f"engine.cpu_blas={missing}", env={**NOT_ARRANGED, "LMX_ADMIN_KEY": ADMIN}
    )
    blas = _health(app)["cpu_blas"]
    if not blas["on_cpu"]:
        pytest.skip("MLX does not compute on the CPU here")
    assert blas["library"] is None and "does not exist" in blas["reason"]
    assert _blas_line(app)["level"] == "WARNING"


@needs_blas
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dense_and_quantized_smollm2_both_answer_paris(appliance_factory) -> None:
    from appliance.engine.builtin import smollm2_path

    try:
        smollm2_path(None)
    except Exception as exc:
        pytest.skip(f"SmolLM2 is not fetched: {exc}")
    app = appliance_factory(
        "models.default=smollm2",
        "models.auto_load=[smollm2]",
        "++models.catalog.smollq.path=builtin:smollm2",
        "++models.catalog.smollq.cpu_weights=quantized",
        env={"LMX_ADMIN_KEY": ADMIN},
    )
    headers = {"Authorization": f"Bearer {ADMIN}"}
    for name, kind in (("smollm2", "dense float32"), ("smollq", "quantized layers as stored")):
        r = httpx.post(
            app.url + "/v1/chat/completions",
            json={
                "model": name,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12,
                "temperature": 0,
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"], (name, r.text)
        models = httpx.get(app.url + "/admin/models", headers=headers).json()
        info = next(m for m in models["data"] if m["name"] == name)
        assert kind in info["extra"]["weights"], info
