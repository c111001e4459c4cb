"""The dashboard at `/ui`: static pages whose JavaScript calls the JSON API with the user's key.

How it is "behind the same keys": the HTML, CSS and JS are public (they hold no data), and every
number on the pages comes from `/v1/...` requests carrying `Authorization: Bearer <key>`. The key
is typed once on `/ui/login`, checked against the API, and kept in the tab's `sessionStorage`
(gone when the tab closes; never in a cookie, so no CSRF surface and nothing sent on page loads).
Live updates use the SSE endpoint through `fetch` (EventSource cannot send the header).

Every `/ui/...` page path answers the same `index.html`; `app.js` reads the path and renders the
jobs list, a job page, the upload page or the login page. Libraries are vendored from npm into
`static/vendor` (see package.json); nothing is loaded from a CDN.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

router = APIRouter(prefix="/ui", include_in_schema=False)

# The page may only load what the app serves itself.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get("")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/")
@router.get("/login")
@router.get("/upload")
@router.get("/jobs/{job_id}")
def page(job_id: str | None = None) -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_PAGE_HEADERS)


def install_ui(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
