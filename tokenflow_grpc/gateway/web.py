"""The web dashboard: a static page at `/` that reads only the public HTTP API.

The page, its script and style, and the vendored Chart.js ship inside the
package, so serving it needs no build step and no network. Every response
carries a Content-Security-Policy that allows this origin only.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"

# The page loads scripts, styles and data from this origin only; Chart.js
# sizes its canvases through the style property, which CSP allows.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time, so an upgraded server never runs an older script.
    "Cache-Control": "no-cache",
}


def add_web_routes(app: web.Application) -> None:
    """Serve the dashboard page at `/` and its files under /static/."""
    app.router.add_get("/", index)
    app.router.add_static(STATIC_PREFIX, STATIC_DIR, show_index=False, follow_symlinks=False)
    app.on_response_prepare.append(_add_security_headers)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/" or request.path.startswith(STATIC_PREFIX):
        response.headers.update(SECURITY_HEADERS)
