"""Fixtures of the playground tests: the `policygrad bandit --json` reference, a TestClient over the app, and (for the
browser tests) a live server and headless Chromium."""

from __future__ import annotations

import pytest
from playground_helpers import CHROMIUM, CHROMIUM_ARGS, serving


@pytest.fixture
def client():
    """A TestClient of a fresh app (4 sessions at most), as a browser on this machine reaches it."""
    from starlette.testclient import TestClient

    from policygrad.playground.app import create_app
    from policygrad.playground.config import LOOPBACK_HOSTS
    from policygrad.playground.session import Sessions

    app = create_app(Sessions(limit=4, idle_seconds=3600), allowed_hosts=list(LOOPBACK_HOSTS))
    with TestClient(app, base_url="http://127.0.0.1:8765", raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def live_server():
    with serving() as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright; skipped (which `make test` refuses) where either is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not installed at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed (pip install playwright)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
