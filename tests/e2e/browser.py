"""Debian's chromium driven by Playwright (never a browser of its own), and the dashboard's sign-in."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def launch_chromium():
    """A module fixture's body: the browser, closed after the module (skips without chromium or playwright)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/install-system-deps installs it)")
    driver = playwright.sync_playwright().start()
    browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    yield browser
    browser.close()
    driver.stop()


def sign_in(browser, url: str, key: str):
    """A page of the dashboard at ``url`` signed in with ``key``."""
    page = browser.new_context(base_url=url, viewport={"width": 1360, "height": 900}).new_page()
    page.goto("/")  # no session yet: the sign-in page
    page.fill("#api-key", key)
    page.click("#sign-in")
    return page
