"""The gate page (docs/GATES.md): a chat with the model beside heatmaps of its LSTM gates, served at `/` on the
HTTP port from the plain files in page/ (no CDN, no build step), so it works offline wherever cellstream runs.

The page and its files are open, like health: a browser cannot send a bearer token with a page it has not
loaded yet. The page asks for a token itself when an API call answers 401.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import Response

from cellstream.service.api.http.endpoint import Api, Call, Handler

PAGE_DIR = Path(__file__).with_name("page")
INDEX = "index.html"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
HEADERS = {
    # Every fetch, script and style from this origin only: the page must not depend on the network beyond
    # this server, and text a model writes into it can never load anything from elsewhere.
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    # Revalidated on each load: a restarted server with a new page is seen at once.
    "Cache-Control": "no-cache",
}


def page_apis() -> list[Api]:
    """`/` for index.html and `/page/<name>` for each other file, read once here: a file the install left
    out fails the server's start, not a visitor's request."""
    apis = []
    for path in sorted(PAGE_DIR.iterdir()):
        if path.suffix not in TYPES:
            raise RuntimeError(f"{path} has no content type in {__name__}.TYPES")
        route = "/" if path.name == INDEX else f"/page/{path.name}"
        apis.append(Api(route, "GET", _serve(path.read_bytes(), TYPES[path.suffix]), f"The gate page: {path.name}",
                        open=True))
    if not any(api.path == "/" for api in apis):
        raise RuntimeError(f"{PAGE_DIR} has no {INDEX}: the gate page is missing from this install")
    return apis


def _serve(content: bytes, media_type: str) -> Handler:
    async def serve(call: Call) -> Response:
        return Response(content, media_type=media_type, headers=HEADERS)

    return serve
