"""The spend dashboard: one static page, served by the proxy, that reads the spend API.

    GET /dashboard                  the page (holds no data: it signs in, then reads /api/v1/)
    GET /dashboard/dashboard.js     its script; dashboard.css its style sheet

The files ship in the package (``proxy/static/dashboard/``) and are read once, when the
app is built; nothing is fetched from anywhere else, so the page works air-gapped. Every
answer carries a strict ``Content-Security-Policy`` (scripts and styles from this origin
only, no inline script, calls to this origin only, no framing). The page keeps the
admin token or tenant key in the tab's session storage and sends it as a bearer to the
spend API, which decides what it may read (``proxy.spend``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from proxy.errors import NotFound

__all__ = ["CSP", "routes"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FILES = {
    "index.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """The page's files, from the package."""
    folder = resources.files("proxy") / "static" / "dashboard"
    return {name: Asset((folder / name).read_bytes(), kind) for name, kind in FILES.items()}


def routes() -> list[web.RouteDef]:
    """``/dashboard`` and its files."""
    assets = load_assets()

    def serve(name: str) -> web.Response:
        asset = assets[name]
        return web.Response(
            body=asset.body,
            content_type=asset.content_type,
            charset="utf-8",
            headers=HEADERS,
        )

    async def page(request: web.Request) -> web.StreamResponse:
        return serve("index.html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in assets or name == "index.html":
            raise NotFound(f"Unknown request URL: {request.method} {request.path}")
        return serve(name)

    async def slash(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect("../dashboard")  # relative: works under a prefix

    return [
        web.get("/dashboard", page),
        web.get("/dashboard/", slash),
        web.get("/dashboard/{name}", asset),
    ]
