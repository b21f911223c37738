"""The status page with no admin key: read-only for a browser on this machine, 403 for any
other client, admin actions hidden with the reason. A real appliance listening on every
address (so that another address of this machine is a client that is not loopback)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any, Optional

import httpx
import psutil
import pytest

from ._browser import launch, page_of

pytestmark = pytest.mark.timeout(120)

APPLIANCE_OVERRIDES = ("logging.file=none", "server.host=0.0.0.0")
ROW = 'tr[data-model="demo"]'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch() as b:
        yield b


def other_address() -> Optional[str]:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback:
                return str(a.address)
    return None


def test_loopback_reads_without_a_key(module_appliance: Any, browser: Any) -> None:
    url = module_appliance.url
    snap = httpx.get(url + "/status.json", timeout=10).json()
    assert snap["access"] == {
        "mode": "open",
        "admin_actions": False,
        "note": snap["access"]["note"],
        "refresh_s": 5.0,
    }
    with page_of(browser) as (page, _):
        page.goto(url + "/status")
        assert not page.locator("#key-panel").is_visible()  # no key to ask for
        page.locator(f'{ROW}[data-state="loaded"]').wait_for()
        assert "builtin:demo" in page.locator(ROW).inner_text()
        # Read-only: no unload buttons, no load form, and the reason is shown.
        assert page.locator("button[data-action]").count() == 0
        assert not page.locator("#load-form").is_visible()
        note = page.inner_text("#mode-note")
        assert "Admin actions are off" in note and "LMX_ADMIN_KEY" in note
        assert not page.locator("#forget-key").is_visible()


def test_other_clients_get_403_saying_how_to_set_a_key(module_appliance: Any) -> None:
    addr = other_address()
    if addr is None:
        pytest.skip("this machine has no address but loopback to be another client from")
    url = f"http://{addr}:{module_appliance.port}"
    for path in ("/status", "/status.json", "/status/app.js"):
        r = httpx.get(url + path, timeout=10)
        assert r.status_code == 403, path
        assert "LMX_ADMIN_KEY" in r.json()["error"]["message"]
    # The rest of the API is unchanged: /v1 answers there (no API key set).
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 200
    # A proxy on this machine does not make its clients local.
    r = httpx.get(
        module_appliance.url + "/status.json", headers={"X-Forwarded-For": addr}, timeout=10
    )
    assert r.status_code == 403
