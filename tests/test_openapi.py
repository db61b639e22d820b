"""vault/openapi.py and the docs page: a complete spec, and docs that need no internet."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.routing import Route
from starlette.testclient import TestClient

from vault.openapi import BASE64_PATTERN
from vault.validation import InvalidValue, decode_secret


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_spec_describes_every_endpoint_with_errors(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    app_paths = {
        route.path
        for route in client.app.routes  # type: ignore[attr-defined]
        if isinstance(route, Route)
    }
    assert set(spec["paths"]) == app_paths  # /openapi.json and /docs included
    for path in ("/vault/secret/create", "/vault/secret/create/"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "413", "500", "503"} <= set(responses)
    fetch = spec["paths"]["/vault/secret/fetch"]["post"]["responses"]
    assert {"200", "400", "404", "413", "500", "503"} <= set(fetch)
    assert "Retry-After" in fetch["503"]["headers"]
    schemas = spec["components"]["schemas"]
    assert schemas["CreateRequest"]["required"] == ["secret"]
    assert schemas["Error"]["required"] == ["detail"]


def test_spec_describes_the_metrics_token_when_one_is_set(
    make_client: Callable[..., TestClient],
) -> None:
    guarded = make_client(METRICS_TOKEN="m" * 40)
    spec = guarded.get("/openapi.json").json()
    metrics = spec["paths"]["/metrics"]["get"]
    assert metrics["security"] == [{"metricsToken": []}]
    assert spec["components"]["securitySchemes"]["metricsToken"]["scheme"] == "bearer"
    assert "WWW-Authenticate" in metrics["responses"]["401"]["headers"]
    refused = guarded.get("/metrics")
    assert refused.status_code == 401 and "www-authenticate" in refused.headers


def test_spec_patterns_match_what_the_server_accepts(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    b64 = re.compile(schemas["CreateRequest"]["properties"]["secret"]["pattern"])
    assert b64.match("aGk=") and not b64.match("aGk") and not b64.match("-_-_")
    assert not b64.match("") and not b64.match("ab==") and b64.match("aQ==")
    uuid_re = re.compile(schemas["FetchRequest"]["properties"]["secret_id"]["pattern"])
    assert uuid_re.match("123e4567-e89b-42d3-a456-426614174000")


def _accepted(value: str) -> bool:
    try:
        decode_secret(value)
    except InvalidValue:
        return False
    return True


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="AQgwaGk+/9=", max_size=12) | st.binary(max_size=9).map(_encode))
def test_the_base64_pattern_accepts_exactly_what_the_server_accepts(value: str) -> None:
    assert bool(re.fullmatch(BASE64_PATTERN, value)) == _accepted(value), value


def test_docs_page_loads_its_assets_locally(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "SwaggerUIBundle" in page.text
    # Off: Swagger UI would send the spec's URL (an internal host name) to swagger.io.
    assert "validatorUrl: null" in page.text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources
    for source in sources:
        assert source.startswith("/"), f"{source} would need the internet"
        asset = client.get(source)
        assert asset.status_code == 200
        assert len(asset.content) > 1000
