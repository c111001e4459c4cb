"""/docs in a real headless Chromium with every request to another host blocked: Swagger UI loads
from the app itself, renders every operation, and breaks no rule of the page's CSP."""

from __future__ import annotations

from urllib.parse import urlsplit

from tests.ui.conftest import screenshot


def test_docs_render_offline_under_their_csp(page, live_server):
    origin = urlsplit(live_server).netloc
    elsewhere: list[str] = []

    def only_this_origin(route):
        if urlsplit(route.request.url).netloc == origin:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_origin)
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.goto(f"{live_server}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = {element.inner_text().replace("\u200b", "") for element in page.query_selector_all(".opblock-summary-path")}
    assert {"/v1/fine_tuning/jobs", "/v1/webhooks", "/v1/models"} <= paths, paths
    assert page.query_selector(".authorize") is not None  # the bearer key can be entered
    screenshot(page, "docs")
    assert elsewhere == [], f"the docs asked another host: {elsewhere}"
    violations = [line for line in console if "Content Security Policy" in line or "Refused to" in line]
    assert violations == [] and page.errors == [], (violations, page.errors)
