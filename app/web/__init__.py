"""The web dashboard: a single page (plain HTML, CSS and JavaScript shipped in this package).

The shell and its assets are public, like any static site; every piece of data
the page shows comes from the authenticated JSON API, called with the key the
user types in (kept in the browser's localStorage).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    # no-cache: a redeployed server's page must not run against stale scripts
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def install_dashboard(app: FastAPI) -> None:
    """Add the page and its assets to `app` (a Mount cannot travel inside an APIRouter)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
