"""The status page in a real browser (headless Chromium) against a real appliance with an admin
key: the key form and nothing else until the key is given, the model and its numbers, updates
after requests, unload and load through the confirmation dialogs, safe mode, phone size and
dark mode. One appliance for the module (one more, briefly, for safe mode)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ._browser import DESKTOP, PHONE, launch, page_of, screenshots

pytestmark = pytest.mark.timeout(180)

ADMIN = "status-page-admin-key-5521"
APPLIANCE_ENV = {"LMX_ADMIN_KEY": ADMIN}
APPLIANCE_OVERRIDES = ("logging.file=none",)
AH = {"Authorization": f"Bearer {ADMIN}"}
ROW = 'tr[data-model="demo"]'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch() as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshots(tmp_path_factory)


def open_with_key(page: Any, url: str) -> None:
    page.goto(url + "/status")
    page.fill("#key-input", ADMIN)
    page.click("#key-form button[type=submit]")
    page.locator("#board").wait_for(state="visible")


def field(page: Any, name: str) -> str:
    return str(page.locator(f'{ROW} [data-field="{name}"]').inner_text())


def chat(url: str, n: int) -> None:
    with httpx.Client(timeout=60) as http:
        for i in range(n):
            r = http.post(
                url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8},
            )
            assert r.status_code == 200, r.text


def test_the_page_is_served_with_a_strict_policy(module_appliance: Any) -> None:
    r = httpx.get(module_appliance.url + "/status", timeout=10)
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text and "<style" not in r.text and " onclick" not in r.text
    assert "builtin:demo" not in r.text  # the shell holds no data
    for asset in ("/status/app.js", "/status/app.css", "/status/icon.svg"):
        a = httpx.get(module_appliance.url + asset, timeout=10)
        assert a.status_code == 200 and a.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(module_appliance.url + "/status.json", timeout=10).status_code == 401


def test_without_the_key_it_shows_only_the_key_form(module_appliance: Any, browser: Any) -> None:
    url = module_appliance.url
    with page_of(browser) as (page, console):
        console.allow(401)  # the wrong key below, and the fetch without one
        page.goto(url + "/status")
        assert page.locator("#key-form").is_visible()
        assert not page.locator("#board").is_visible()
        assert page.locator(f"{ROW}").count() == 0
        assert "builtin:demo" not in page.content()
        assert page.evaluate("fetch('/status.json').then(r => r.status)") == 401
        page.fill("#key-input", "not-the-key")
        page.click("#key-form button[type=submit]")
        page.locator("#key-error").wait_for(state="visible")
        assert "refused" in page.inner_text("#key-error")
        assert not page.locator("#board").is_visible()
        assert page.evaluate("sessionStorage.length") == 0


def test_with_the_key_it_shows_the_model_and_its_numbers(
    module_appliance: Any, browser: Any
) -> None:
    url = module_appliance.url
    with page_of(browser) as (page, _):
        open_with_key(page, url)
        assert ADMIN not in page.url  # the key never goes into a URL
        assert page.evaluate("Object.values(sessionStorage)") == [ADMIN]
        page.locator(f'{ROW}[data-state="loaded"]').wait_for()
        row = page.locator(ROW).inner_text()
        assert "builtin:demo" in row and "context_length=2048" in row and "max_tokens=512" in row
        assert page.inner_text("#health") in ("ok", "degraded")
        assert page.inner_text("#ready") == "ready"
        assert page.inner_text("#version")
        assert "MiB" in page.inner_text("#mem-system") or "GiB" in page.inner_text("#mem-system")
        assert page.locator("#cache-entries").is_visible()
        # The admin actions are offered with the key.
        assert page.locator(f'{ROW} button[data-action="unload"]').is_visible()
        assert page.locator("#load-form").is_visible()
        # The key stays with the tab: a reload shows the board again without asking.
        page.reload()
        page.locator("#board").wait_for(state="visible")
        assert not page.locator("#key-panel").is_visible()
        page.click("#forget-key")
        page.locator("#key-form").wait_for(state="visible")
        assert not page.locator("#board").is_visible()
        assert page.evaluate("sessionStorage.length") == 0


def test_it_updates_after_requests_are_served(
    module_appliance: Any, browser: Any, shots: Path
) -> None:
    url = module_appliance.url
    with page_of(browser, color_scheme="light") as (page, console):
        console.allow(404)  # the unknown route asked below, listed under recent errors
        open_with_key(page, url)
        page.locator(f'{ROW}[data-state="loaded"]').wait_for()
        served, tokens = int(field(page, "requests_served")), int(field(page, "tokens_generated"))
        chat(url, 3)
        assert httpx.get(url + "/no/such/route", timeout=10).status_code == 404
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and int(field(page, "requests_served")) < served + 3:
            time.sleep(0.25)
        assert int(field(page, "requests_served")) == served + 3
        assert int(field(page, "tokens_generated")) > tokens
        assert field(page, "ttft_p50_s") != "–"
        page.locator('#errors tr[data-status="404"][data-path="other"]').wait_for()
        # The charts: a sample after the requests shows tokens/s above zero.
        page.wait_for_function(
            "() => !document.querySelector('#chart-tokens-max').textContent.endsWith(' 0.00')"
            " && document.querySelector('#chart-tokens path.line') !== null",
            timeout=30_000,
        )
        page.screenshot(path=str(shots / "status-page.png"), full_page=True)
        snap = httpx.get(url + "/status.json", headers=AH, timeout=10).json()
        demo = next(m for m in snap["models"] if m["name"] == "demo")
        assert demo["requests_served"] >= served + 3 and demo["ttft_p50_s"] is not None
        assert snap["prompt_cache"]["hits"] + snap["prompt_cache"]["misses"] >= 3
        assert any(s["tokens_per_s"] > 0 for s in snap["history"]["samples"])


def test_unload_and_load_through_the_dialogs(module_appliance: Any, browser: Any) -> None:
    url = module_appliance.url
    with page_of(browser) as (page, console):
        open_with_key(page, url)
        unload = page.locator(f'{ROW} button[data-action="unload"]')
        dialog = page.locator("dialog#confirm")
        # Cancel leaves the model loaded.
        unload.click()
        dialog.wait_for(state="visible")
        assert "Unload demo?" in page.inner_text("#confirm-title")
        page.click("#confirm-cancel")
        dialog.wait_for(state="hidden")
        time.sleep(0.3)
        assert page.locator(ROW).get_attribute("data-state") == "loaded"
        # Confirm unloads it.
        unload.click()
        dialog.wait_for(state="visible")
        page.click("#confirm-ok")
        page.locator(f'{ROW}[data-state="unloaded"]').wait_for()
        assert "Unloaded demo" in page.inner_text("#action-result")
        assert httpx.get(url + "/readyz", timeout=10).status_code == 503
        # Load it back through the form: only the filled field is sent (the API names others).
        page.fill("#load-model", "demo")
        page.click("#load-submit")
        dialog.wait_for(state="visible")
        page.click("#confirm-ok")
        page.locator(f'{ROW}[data-state="loaded"]').wait_for(timeout=60_000)
        assert "Loaded demo" in page.inner_text("#action-result")
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200
        # A refused load shows the API's own message.
        console.allow(400, 404)
        body = {"path": "/no/such/model/folder"}
        api = httpx.post(url + "/admin/models/load", json=body, headers=AH, timeout=30)
        assert api.status_code >= 400
        page.fill("#load-model", "")
        page.fill("#load-path", body["path"])
        page.click("#load-submit")
        dialog.wait_for(state="visible")
        page.click("#confirm-ok")
        result = page.locator("#action-result.bad")
        result.wait_for()
        assert result.inner_text() == "Refused: " + api.json()["error"]["message"]


def test_phone_size_and_dark_mode(module_appliance: Any, browser: Any, shots: Path) -> None:
    url = module_appliance.url
    with page_of(browser, viewport=PHONE, color_scheme="dark", is_mobile=True) as (page, _):
        open_with_key(page, url)
        page.locator(f'{ROW}[data-state="loaded"]').wait_for()
        # Nothing wider than the screen: no sideways scrolling of the page.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        # The models table turns into one card per model.
        assert page.locator("#models thead").is_hidden()
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(15, 19, 25)"
        page.screenshot(path=str(shots / "status-page-phone-dark.png"), full_page=True)
    with page_of(browser, viewport=DESKTOP, color_scheme="light") as (page, _):
        page.goto(url + "/status")
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == (
            "rgb(246, 247, 249)"
        )


def test_leaving_safe_mode_from_the_page(
    appliance_factory: Any, browser: Any, tmp_path: Path
) -> None:
    """A state file that records a crash loop starts the appliance in safe mode."""
    state = tmp_path / "state.json"
    now = time.time()
    state.write_text(
        json.dumps(
            {
                "clean_shutdown": False,
                "models": [],
                "starts": [{"at": now - t, "clean": False} for t in (30, 20, 10)],
            }
        )
    )
    app = appliance_factory(
        f"state.path={state}", "logging.file=none", env=APPLIANCE_ENV, wait="/healthz"
    )
    with page_of(browser) as (page, _):
        open_with_key(page, app.url)
        banner = page.locator("#safe-mode")
        banner.wait_for(state="visible")
        assert "crash loop" in page.inner_text("#safe-mode-reason")
        page.click("#safe-mode-exit")
        page.locator("dialog#confirm").wait_for(state="visible")
        page.click("#confirm-ok")
        banner.wait_for(state="hidden")
        assert page.inner_text("#action-result") == "Safe mode is off."
    health = httpx.get(app.url + "/admin/health", headers=AH, timeout=10).json()
    assert health["safe_mode"] is False
