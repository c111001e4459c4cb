"""/docs works without internet: Swagger UI's assets come from the app (the fastapi-offline
package), the page names no other host and runs no inline script, and it carries a CSP with
frame-ancestors like /ui. SDPO_DOCS_ENABLED turns the docs and the schema off (default in
production). The page itself rendering in Chromium offline: tests/ui/test_docs_page.py."""

from __future__ import annotations

import re

from core.settings import Settings

ASSET_RE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def test_docs_reference_only_same_origin_assets_that_answer(client):
    response = client.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "http://" not in page and "https://" not in page and "//" not in page.replace("<!doctype html>", "")
    assets = ASSET_RE.findall(page)
    assert {a.rsplit("/", 1)[-1] for a in assets} == {"favicon.png", "swagger-ui.css", "swagger-ui-bundle.js",
                                                      "init.js"}
    for asset in assets:
        assert asset.startswith("/docs/"), asset
        fetched = client.get(asset)
        assert fetched.status_code == 200 and fetched.content, asset
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith(
        ("text/javascript", "application/javascript"))
    init = client.get("/docs/init.js").text
    assert "validatorUrl: null" in init and "http" not in init
    # The spec's URL is data, not script: every <script> loads a file.
    assert re.findall(r"<script[^>]*>\s*[^<\s]", page) == []
    assert len(re.findall(r"<script src=", page)) == len(re.findall(r"<script", page)) == 2
    assert 'data-openapi-url="/openapi.json"' in page and client.get("/openapi.json").status_code == 200


def test_docs_carry_a_strict_csp_and_cannot_be_framed(client):
    headers = client.get("/docs").headers
    csp = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and "unsafe" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"


def test_fastapis_cdn_pages_are_gone(client):
    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path


def test_docs_can_be_turned_off_and_are_off_in_production_by_default(make_client, settings):
    off = make_client(docs_enabled=False)
    for path in ("/docs", "/docs/init.js", "/docs/assets/swagger-ui.css", "/openapi.json"):
        assert off.get(path).status_code == 404, path
    assert off.get("/healthz").status_code == 200
    strong = "sk-" + "x" * 40
    assert Settings(environment="production", admin_key=strong).docs_enabled is False
    assert Settings(environment="production", admin_key=strong, docs_enabled=True).docs_enabled is True
    assert Settings(environment="development").docs_enabled is True
