"""The gate page's files on the HTTP port: `/` and its assets are served without a token on a server that
asks for one (the API still does), with their content types and a policy that keeps the page on this origin,
and refer to nothing outside it; they stay out of the OpenAPI document, and other paths and methods still get
the API's errors. The page itself is tested in a browser by tests/e2e/test_gate_page.py."""

from __future__ import annotations

import re

import pytest

from cellstream.bench.server import free_ports
from cellstream.service.api.http.page_routes import PAGE_DIR

pytestmark = pytest.mark.timeout(120)

TOKEN = "page-test-token-0123456789abcdef"
TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}
# A standalone SVG must name its XML namespace; the name is an identifier, never fetched.
SVG_NAMESPACE = 'xmlns="http://www.w3.org/2000/svg"'


@pytest.fixture
async def server(start, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {TOKEN}\n")
    [port] = free_ports(1)
    return await start(http_port=port, auth_token_file=tokens)


async def test_the_page_and_its_files_need_no_token(server, http, scrape):
    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert (await http.get("/v1/models")).status_code == 401, "the API still needs the token"
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(assets) == ["page/icon.svg", "page/page.css", "page/page.js"]
    for asset in assets:
        response = await http.get(f"/{asset}")
        assert response.status_code == 200, asset
        assert response.headers["content-type"] == TYPES[asset.rsplit(".", 1)[1]], asset
    samples = await scrape(server)
    assert samples.get("cellstream_http_requests_total", route="/", code="200") == 1
    assert samples.get("cellstream_http_requests_total", route="/page/page.js", code="200") == 1


def test_the_page_refers_to_nothing_outside_its_server():
    files = sorted(PAGE_DIR.iterdir())
    assert {f.name for f in files} == {"index.html", "page.js", "page.css", "icon.svg"}
    for path in files:
        text = path.read_text().replace(SVG_NAMESPACE, "")
        assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", text, re.IGNORECASE), path.name


async def test_other_paths_still_get_the_api_s_errors_and_the_document_leaves_the_page_out(server, http):
    missing = await http.get("/page/nope.js")
    assert missing.status_code == 404 and "has no route" in missing.json()["error"]
    assert (await http.post("/", content=b"")).status_code == 405
    assert (await http.head("/")).status_code == 200
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert not [path for path in paths if path == "/" or path.startswith("/page/")]
