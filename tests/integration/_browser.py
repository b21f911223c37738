"""A real browser for the status page tests: Debian's Chromium, driven by Playwright.

Chromium comes from the system (`apt-get install chromium`; `scripts/ensure-chromium.sh` does it
for `make test`), never from `playwright install`. Tests skip, saying why, only where no
Chromium can be found.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import pytest

CHROMIUM_ENV = "CHROMIUM"  # another Chromium binary, if not /usr/bin/chromium
SCREENSHOTS_ENV = "STATUS_SCREENSHOTS"  # where the screenshots go (default: a temp folder)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1440, "height": 1000}
PHONE = {"width": 390, "height": 844}
# How Chromium reports a fetch answered 4xx on the console (not a page error, but logged).
_HTTP_ERROR = re.compile(r"status of (\d{3})")


def chromium() -> Optional[str]:
    for candidate in (os.environ.get(CHROMIUM_ENV), "/usr/bin/chromium", "chromium"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@contextmanager
def launch() -> Iterator[Any]:
    """A headless Chromium for one test module; skips when there is none."""
    path = chromium()
    if path is None:
        pytest.skip(
            f"no Chromium at /usr/bin/chromium or on PATH (apt-get install chromium, or set "
            f"{CHROMIUM_ENV}); the status page's browser tests need one"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class Console:
    """Console errors and uncaught exceptions of one page. A test that provokes an HTTP error
    on purpose (a wrong key, a refused load) says which statuses it expects with `allow`."""

    def __init__(self, page: Any) -> None:
        self.messages: list[str] = []
        self.allowed: set[int] = set()
        page.on("console", lambda m: self.messages.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.messages.append(f"uncaught: {exc}"))

    def allow(self, *statuses: int) -> None:
        self.allowed.update(statuses)

    def unexpected(self) -> list[str]:
        out = []
        for text in self.messages:
            m = _HTTP_ERROR.search(text)
            if m and int(m.group(1)) in self.allowed:
                continue
            out.append(text)
        return out


@contextmanager
def page_of(browser: Any, **context: Any) -> Iterator[tuple[Any, Console]]:
    """A fresh browser context (its own sessionStorage) and page; fails the test on any
    console error or uncaught exception it did not expect."""
    ctx = browser.new_context(viewport=context.pop("viewport", DESKTOP), **context)
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    console = Console(page)
    try:
        yield page, console
        assert console.unexpected() == [], "console errors on the status page"
    finally:
        ctx.close()


def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder screenshots go to: $STATUS_SCREENSHOTS, else a temp folder."""
    folder = os.environ.get(SCREENSHOTS_ENV)
    path = Path(folder) if folder else tmp_path_factory.mktemp("status-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
