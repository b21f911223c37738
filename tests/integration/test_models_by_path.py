"""Models an operator actually has: loaded by path with a preset and settings, kept in the
state file across a restart and a crash, and every bad load a clear 4xx that leaves nothing."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..unit.gguf_util import encode_tensor, write_tiny
from ._resilience import ADMIN_ENV, ADMIN_KEY, BASE, admin_get, admin_post, loaded

pytestmark = pytest.mark.timeout(240)

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
PRESET = ("+models.presets.small={context_length:512,max_tokens:8}",)


def _load(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + "/admin/models/load", json=body, headers=AUTH, timeout=120)


def _view(url: str, name: str) -> dict[str, Any]:
    models = admin_get(url, "/admin/models")["data"]
    return next(m for m in models if m["name"] == name)


def _names(url: str) -> list[str]:
    return [m["name"] for m in admin_get(url, "/admin/models")["data"]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf", "Q8_0")


def test_a_gguf_by_path_with_a_preset_survives_restart_and_crash(
    appliance_factory: Any, tiny: Path, tmp_path: Path
) -> None:
    state = f"state.path={tmp_path / 'state.json'}"
    a = appliance_factory(*BASE, *PRESET, state, env=ADMIN_ENV, home=tmp_path / "a")
    got = admin_post(
        a.url,
        "/admin/models/load",
        {"path": str(tiny), "alias": "tiny", "preset": "small", "max_tokens": 6},
        timeout=120,
    )
    view = got["model"]
    assert view["source"] == "admin" and view["loaded"] and view["path"] == str(tiny)
    # The preset's context length, the request's own max_tokens over the preset's.
    assert view["settings"]["context_length"] == 512 and view["max_tokens"] == 6
    assert view["settings"]["preset"] == "small" and view["last_load_seconds"] > 0
    assert view["memory_estimate_bytes"] > 0
    r = httpx.post(
        a.url + "/v1/completions",
        json={"model": "tiny", "prompt": "hi", "max_tokens": 50},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 6  # the model's own max_tokens holds
    # The same load again is a no-op; other settings for a loaded name are refused.
    again = _load(a.url, {"path": str(tiny), "alias": "tiny", "preset": "small", "max_tokens": 6})
    assert again.status_code == 200 and again.json()["already_loaded"]
    other = _load(a.url, {"path": str(tiny), "alias": "tiny", "max_tokens": 7})
    assert other.status_code == 400 and "unload it first" in other.json()["error"]["message"]

    assert a.stop() == 0  # a clean restart: the model comes back, same settings
    b = appliance_factory(*BASE, *PRESET, state, env=ADMIN_ENV, home=tmp_path / "b")
    b.wait_for("/readyz")
    assert "tiny" in loaded(b.url) or _view_loaded(b.url, "tiny")
    back = _view(b.url, "tiny")
    assert back["source"] == "admin" and back["settings"] == view["settings"]

    b.signal(signal.SIGKILL)  # a crash: recovered too
    b.proc.wait(30)  # type: ignore[union-attr]
    c = appliance_factory(*BASE, *PRESET, state, env=ADMIN_ENV, home=tmp_path / "c")
    assert _view_loaded(c.url, "tiny")
    assert _view(c.url, "tiny")["settings"] == view["settings"]


def _view_loaded(url: str, name: str, timeout: float = 60.0) -> bool:
    from ._resilience import wait_until

    return bool(wait_until(lambda: name in loaded(url), timeout=timeout, what=f"{name} loaded"))


def test_bad_loads_name_the_cause_and_leave_nothing(
    module_appliance_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    a = module_appliance_factory(*BASE, *PRESET, env=ADMIN_ENV)
    files = tmp_path_factory.mktemp("bad")
    falcon = write_tiny(files / "falcon.gguf", "Q8_0", arch="falcon")
    import numpy as np

    data, raw = encode_tensor(np.zeros((4, 256)), "Q8_1", np.random.default_rng(0))
    q81 = write_tiny(files / "q81.gguf", "Q8_0", extra_tensors={"blk.0.extra.weight": (data, raw)})
    cases = [
        ({"path": str(files / "missing.gguf"), "alias": "m1"}, "missing.gguf", "path"),
        ({"path": str(files / "nope"), "alias": "m2"}, "nope", None),
        ({"path": str(falcon), "alias": "m3"}, "'falcon'", None),
        ({"path": str(q81), "alias": "m4"}, "Q8_1", None),
        ({"path": str(q81), "alias": "m5", "preset": "huge"}, "huge", "preset"),
        ({"path": str(q81), "alias": "m6", "context_length": 1}, ">= 16", "context_length"),
        ({"path": str(q81), "alias": "m7", "warp": 9}, "warp", "warp"),
        ({"model": "demo", "max_tokens": 5}, "by path", "max_tokens"),
        ({"path": str(q81), "alias": "demo"}, "catalog model", "alias"),
    ]
    for body, named, param in cases:
        r = _load(a.url, body)
        assert 400 <= r.status_code < 500, (body, r.text)
        err = r.json()["error"]
        assert named in err["message"], (body, err)
        if param is not None:
            assert err["param"] == param, (body, err)
    names = _names(a.url)
    assert not any(n.startswith("m") and n[1:].isdigit() for n in names), names
    assert httpx.get(a.url + "/readyz", timeout=10).status_code == 200  # the server stays up


def test_a_model_that_does_not_fit_is_refused(
    appliance_factory: Any, tiny: Path, tmp_path: Path
) -> None:
    a = appliance_factory(
        *BASE,
        "models.auto_load=[]",
        "limits.mlx_memory_limit_bytes=1024",
        env=ADMIN_ENV,
        wait="/healthz",
    )
    r = _load(a.url, {"path": str(tiny), "alias": "big"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_memory" and "GiB" in err["message"]
    assert "big" not in _names(a.url)


def test_an_mlx_folder_by_path_takes_its_own_name(
    module_appliance_factory: Any, demo_model_dir: Path
) -> None:
    a = module_appliance_factory(*BASE, "models.auto_load=[]", env=ADMIN_ENV, wait="/healthz")
    got = admin_post(a.url, "/admin/models/load", {"path": str(demo_model_dir)}, timeout=120)
    name = demo_model_dir.name
    assert got["model"]["name"] == name and got["model"]["source"] == "admin"
    r = httpx.post(
        a.url + "/v1/chat/completions",
        timeout=60,
        json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert r.status_code == 200 and r.json()["model"] == name
