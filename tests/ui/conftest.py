"""Browser tests: Debian's Chromium driven by Playwright (never a browser Playwright downloads),
and the e2e service on a Redis database of its own for the full job flow.

Screenshots go to `artifacts/ui/` at the repository root (git-ignored) and are printed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.webhooks.conftest import started_service, tiny_model  # noqa: F401  (fixture)

UI_REDIS_DB = 10
CHROMIUM = os.environ.get("SDPO_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium; fails (not skips) when Chromium or Playwright is missing:
    `bash scripts/install-ui-test.sh` installs both."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} not found: run scripts/install-ui-test.sh"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def login(page, base_url: str, key: str, next_path: str = "/ui/") -> None:
    page.goto(f"{base_url}{next_path}")
    page.wait_for_url("**/ui/login**")
    page.fill("#api-key", key)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"**{next_path}")


@pytest.fixture
def service(tmp_path, postgres_server_url, redis_url, tiny_model):  # noqa: F811
    yield from started_service(tmp_path, postgres_server_url, redis_url, tiny_model, UI_REDIS_DB)
