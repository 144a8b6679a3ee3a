"""/docs and /redoc link only to files the service serves itself, under the one /static mount."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import esci_reranker
from esci_reranker.serve import create_app, load_settings
from esci_reranker.serve.web import STATIC_DIR, static_files

ROOT = Path(__file__).resolve().parents[2]
#: src= and href= of every element (the pages' scripts, styles and icons).
_LINKS = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""")
_SPEC_URL = re.compile(r"""\bspec-url\s*=\s*["']([^"']*)["']|\burl:\s*'([^']*)'""")


def _links(html: str) -> list[str]:
    return _LINKS.findall(html)


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        (
            "/docs",
            {"/static/swagger/swagger-ui-bundle.js", "/static/swagger/swagger-ui.css", "/static/favicon.svg"},
        ),
        ("/redoc", {"/static/redoc/redoc.standalone.js", "/static/favicon.svg"}),
    ],
)
def test_docs_pages_load_only_local_files(client, page, assets):
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    links = _links(response.text)
    assert set(links) == assets
    for link in links:
        served = client.get(link)
        assert served.status_code == 200, link
        assert served.content, link
    assert "fonts.googleapis" not in response.text
    spec = next(m for m in _SPEC_URL.findall(response.text))
    assert "/openapi.json" in spec


def test_assets_have_browser_content_types(client):
    assert (
        client.get("/static/swagger/swagger-ui-bundle.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert client.get("/static/swagger/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert (
        client.get("/static/redoc/redoc.standalone.js").headers["content-type"].startswith("text/javascript")
    )
    favicon = client.get("/static/favicon.svg")
    assert favicon.headers["content-type"] == "image/svg+xml"
    assert favicon.content == (STATIC_DIR / "favicon.svg").read_bytes()


def test_third_party_licences_are_served_beside_their_files(client):
    assert "Apache License" in client.get("/static/swagger/LICENSE").text
    assert "MIT" in client.get("/static/redoc/redoc.standalone.js.LICENSE.txt").text


def test_redoc_logo_is_sent_to_the_static_copy(client):
    response = client.get("/redoc/logo-mini.svg", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/static/redoc/logo-mini.svg"
    logo = client.get(response.headers["location"])
    assert logo.status_code == 200
    assert logo.headers["content-type"] == "image/svg+xml"


def test_pages_keep_a_proxy_root_path(tiny_reranker):
    app = create_app(load_settings(), tiny_reranker)
    with TestClient(app, root_path="/reranker") as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            assert all(link.startswith("/reranker/static/") for link in _links(html)), page
            assert "/reranker/openapi.json" in html
        location = client.get("/redoc/logo-mini.svg", follow_redirects=False).headers["location"]
        assert location == "/reranker/static/redoc/logo-mini.svg"


def test_missing_file_is_a_json_404(client):
    response = client.get("/static/swagger/nope.js")
    assert response.status_code == 404


def test_static_files_share_one_metrics_label(client):
    client.get("/static/favicon.svg")
    client.get("/static/swagger/swagger-ui.css")
    text = client.get("/metrics").text
    assert 'esci_http_requests_total{endpoint="/static",method="GET",status="200"} 2.0' in text
    assert "favicon" not in text


def test_static_files_do_not_count_against_the_rate_limit(make_client):
    client = make_client(rate_limit="2/minute")
    for _ in range(5):
        assert client.get("/static/swagger/swagger-ui.css").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 429


def test_docs_pages_stay_open_with_an_api_key(make_client):
    client = make_client(api_key="k3y")
    assert client.get("/docs").status_code == 200
    assert client.get("/static/swagger/swagger-ui-bundle.js").status_code == 200
    assert client.post("/rerank", json={"query": "q", "candidates": []}).status_code == 401


def test_missing_docs_assets_package_names_the_extra(monkeypatch):
    monkeypatch.setattr("esci_reranker.serve.web.DOCS_ASSETS_PACKAGE", "no_such_docs_assets_pkg")
    with pytest.raises(ImportError, match=r"no_such_docs_assets_pkg.*esci-reranker\[serve\]"):
        static_files()


def test_package_data_globs_carry_every_static_file():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package_dir = Path(esci_reranker.__file__).parent
    carried = {path for pattern in globs["esci_reranker"] for path in package_dir.glob(pattern)}
    files = {path for path in STATIC_DIR.rglob("*") if path.is_file()}
    assert files
    assert files <= carried
