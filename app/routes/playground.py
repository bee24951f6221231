"""The web playground at `/`: three static files shipped in the package (app/static/), no build
step and nothing from a CDN. It talks to the same public API as any client; the API key it uses
is kept in the browser (localStorage) and sent as the Authorization header."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from latentd.app.errors import ApiError

STATIC = Path(__file__).resolve().parent.parent / "static"
FILES = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "icon.svg": "image/svg+xml"}
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # same-origin API calls; images from signed URLs, data: previews and blob: downloads
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{name}")
async def asset(name: str):
    if name not in FILES:                        # a fixed set: no paths from the request
        raise ApiError(404, "not_found", "no such file", "path")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)
