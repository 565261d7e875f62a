"""The web dashboard: a static page at `/` that reads only the public HTTP API.

The page, its script and style, and the vendored Chart.js ship inside the
package, so serving it needs no build step and no network. Only the files
found in the static folder at start are served, by name, so no request path
can reach another file. Errors have a google.rpc.Status body like the API's.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from aiohttp import web

from tokenflow_grpc.gateway.responses import read_only
from tokenflow_grpc.gateway.transcode import status_json

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


class WebDashboard:
    """Serves index.html at `/` and the other static files under /static/."""

    def __init__(self, directory: Path = STATIC_DIR) -> None:
        self.index = directory / "index.html"
        self.files = {
            path.relative_to(directory).as_posix(): path
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        }

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/", read_only(self.page))
        app.router.add_route("*", STATIC_PREFIX + "{name:.*}", read_only(self.static_file))

    async def page(self, request: web.Request) -> web.StreamResponse:
        return self._serve(self.index)

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        path = self.files.get(request.match_info["name"])
        if path is None:
            return web.json_response(
                status_json(grpc.StatusCode.NOT_FOUND, f"no static file {request.path}"),
                status=404,
            )
        return self._serve(path)

    def _serve(self, path: Path) -> web.StreamResponse:
        return web.FileResponse(path, headers=SECURITY_HEADERS)
