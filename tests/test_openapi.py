"""vault/openapi.py and the docs page: a complete spec, and docs that need no internet."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.routing import Route
from starlette.testclient import TestClient

from tests.conftest import RawRecords
from vault.errors import InvalidValue
from vault.openapi import BASE64_PATTERN, build_openapi
from vault.records import record_key
from vault.validation import decode_secret

# The other spelling of each secret path: a route that answers like the documented one, named
# in that operation's description rather than listed a second time (so /docs shows it once).
OTHER_SPELLINGS = {
    "/vault/secret/create": "/vault/secret/create/",
    "/vault/secret/fetch/": "/vault/secret/fetch",
    "/vault/secret/delete/": "/vault/secret/delete",
    "/vault/secret/status/": "/vault/secret/status",
}


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
    # /openapi.json and /docs included; each other spelling is named, not listed again.
    assert set(spec["paths"]) == app_paths - set(OTHER_SPELLINGS)
    assert set(OTHER_SPELLINGS) <= app_paths
    for other, documented in OTHER_SPELLINGS.items():
        assert f"`{other}`" in spec["paths"][documented]["post"]["description"]
    responses = spec["paths"]["/vault/secret/create/"]["post"]["responses"]
    assert {"200", "400", "413", "500", "503"} <= set(responses)
    fetch = spec["paths"]["/vault/secret/fetch"]["post"]["responses"]
    assert {"200", "400", "404", "413", "500", "503"} <= set(fetch)
    assert "Retry-After" in fetch["503"]["headers"]
    schemas = spec["components"]["schemas"]
    assert schemas["CreateRequest"]["required"] == ["secret"]
    assert schemas["Error"]["required"] == ["detail"]


def test_docs_list_each_operation_once_grouped_by_tag(
    make_client: Callable[..., TestClient],
) -> None:
    spec = make_client().get("/openapi.json").json()
    operations = [
        (f"{method.upper()} {path}", operation)
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    ]
    ids = [operation["operationId"] for _, operation in operations]
    assert len(ids) == len(set(ids)), ids
    tags = [tag["name"] for tag in spec["tags"]]
    assert tags == ["secrets", "health", "metrics", "documentation"]
    grouped: dict[str, set[str]] = {}
    for name, operation in operations:
        (tag,) = operation["tags"]
        grouped.setdefault(tag, set()).add(name)
    assert grouped == {
        "secrets": {
            "POST /vault/secret/create/",
            "POST /vault/secret/fetch",
            "POST /vault/secret/delete",
            "POST /vault/secret/status",
        },
        "health": {"GET /healthz", "GET /readyz"},
        "metrics": {"GET /metrics"},
        "documentation": {"GET /openapi.json", "GET /docs"},
    }
    quiet = make_client(METRICS_ENABLED="false").get("/openapi.json").json()
    assert [tag["name"] for tag in quiet["tags"]] == ["secrets", "health", "documentation"]


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


# --- the lifecycle: ttl_seconds, max_reads, expires_at, reads_left, delete -------------------


def test_spec_describes_delete_like_fetch_once_for_both_spellings(
    client: TestClient, raw_records: RawRecords
) -> None:
    spec = client.get("/openapi.json").json()
    assert "/vault/secret/delete/" not in spec["paths"]
    delete = spec["paths"]["/vault/secret/delete"]["post"]
    assert delete["operationId"] == "deleteSecret"
    fetch = spec["paths"]["/vault/secret/fetch"]["post"]
    # The same answers but fetch's 403 of a secret under a passphrase (a delete needs none).
    assert set(delete["responses"]) == set(fetch["responses"]) - {"403"}
    assert {"200", "400", "404", "415", "429", "503"} <= set(delete["responses"])
    body = delete["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/DeleteRequest"}
    ok = delete["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/DeleteResponse"}
    # Both spellings answer what the one listed documents: the deletion, then the 404.
    for path in ("/vault/secret/delete", "/vault/secret/delete/"):
        created = client.post("/vault/secret/create/", json={"secret": "aGk="})
        secret_id = created.json()["secret_id"]
        deleted = client.post(path, json={"secret_id": secret_id})
        assert deleted.json() == {"secret_id": secret_id, "deleted": True}, path
        assert record_key(secret_id) not in raw_records.record_keys()
        again = client.post(path, json={"secret_id": secret_id})
        assert again.status_code == 404 and "404" in delete["responses"], path
    schemas = spec["components"]["schemas"]
    # The id in the body, never in the URL (it is a bearer capability that proxies would log).
    assert "parameters" not in spec["paths"]["/vault/secret/delete"]["post"]
    assert schemas["DeleteRequest"]["required"] == ["secret_id"]
    fetch_fields = schemas["FetchRequest"]["properties"]
    assert schemas["DeleteRequest"]["properties"] == {
        name: field for name, field in fetch_fields.items() if name != "passphrase"
    }
    assert schemas["DeleteResponse"] == {
        "type": "object",
        "required": ["secret_id", "deleted"],
        "properties": {
            "secret_id": {"type": "string", "format": "uuid"},
            "deleted": {"type": "boolean", "enum": [True]},
        },
    }
    # Expired, used up, deleted and unknown look the same, and the document says so.
    not_found = spec["paths"]["/vault/secret/fetch"]["post"]["responses"]["404"]
    assert not_found == spec["paths"]["/vault/secret/delete"]["post"]["responses"]["404"]
    for word in ("expired", "reads", "deleted"):
        assert word in not_found["description"]


def test_delete_needs_the_api_key_in_the_spec_when_keys_are_on(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(API_KEYS="ops:" + "a" * 40)
    spec = client.get("/openapi.json").json()
    delete = spec["paths"]["/vault/secret/delete"]["post"]
    assert delete["security"] == [{"apiKey": []}]
    assert "WWW-Authenticate" in delete["responses"]["401"]["headers"]
    assert "WWW-Authenticate" in delete["responses"]["403"]["headers"]
    assert "scopes" in delete["responses"]["403"]["description"]
    for path in ("/vault/secret/delete", "/vault/secret/delete/"):
        refused = client.post(path, json={"secret_id": "00000000-0000-4000-8000-000000000000"})
        assert refused.status_code == 401 and "www-authenticate" in refused.headers, path


def test_readers_and_the_403_are_in_the_spec_only_when_keys_are_on(
    make_client: Callable[..., TestClient], client: TestClient
) -> None:
    guarded = make_client(API_KEYS="ops:" + "a" * 40).get("/openapi.json").json()
    readers = guarded["components"]["schemas"]["CreateRequest"]["properties"]["readers"]
    assert (readers["minItems"], readers["maxItems"], readers["uniqueItems"]) == (1, 100, True)
    assert readers["items"]["pattern"] == "^[A-Za-z0-9._-]{1,64}$"
    assert "readers" in guarded["components"]["schemas"]["CreateResponse"]["properties"]
    assert "readers" in guarded["components"]["schemas"]["FetchResponse"]["properties"]
    for path in ("/vault/secret/create/", "/vault/secret/fetch", "/vault/secret/delete"):
        assert "scope" in guarded["paths"][path]["post"]["responses"]["403"]["description"]
    fetch_403 = guarded["paths"]["/vault/secret/fetch"]["post"]["responses"]["403"]
    assert "passphrase" in fetch_403["description"] and "WWW-Authenticate" in fetch_403["headers"]
    assert (
        "readers"
        in guarded["paths"]["/vault/secret/create/"]["post"]["responses"]["400"]["description"]
    )
    # Without keys there are no names to give, and no scope to lack: fetch's only 403 is a
    # passphrase's.
    open_spec = client.get("/openapi.json").json()
    assert "readers" not in open_spec["components"]["schemas"]["CreateRequest"]["properties"]
    for path in ("/vault/secret/create/", "/vault/secret/delete"):
        assert "403" not in open_spec["paths"][path]["post"]["responses"]
    locked = open_spec["paths"]["/vault/secret/fetch"]["post"]["responses"]["403"]
    assert "scope" not in locked["description"] and "passphrase" in locked["description"]


def test_spec_describes_the_optional_create_fields(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    create = schemas["CreateRequest"]
    assert create["required"] == ["secret"]  # both new fields are optional
    ttl = create["properties"]["ttl_seconds"]
    assert (ttl["type"], ttl["minimum"], ttl["maximum"]) == ("integer", 1, 315360000)
    reads = create["properties"]["max_reads"]
    assert (reads["type"], reads["minimum"], reads["maximum"]) == ("integer", 1, 1000000)
    assert "SECRET_DEFAULT_TTL_SECONDS" in ttl["description"]


def test_the_ttl_maximum_is_the_configured_one(make_client: Callable[..., TestClient]) -> None:
    spec = make_client(SECRET_MAX_TTL_SECONDS="86400").get("/openapi.json").json()
    ttl = spec["components"]["schemas"]["CreateRequest"]["properties"]["ttl_seconds"]
    assert ttl["maximum"] == 86400


def test_build_openapi_defaults_to_a_ten_year_ttl_cap() -> None:
    spec = build_openapi(max_secret_bytes=10, max_body_bytes=100)
    ttl = spec["components"]["schemas"]["CreateRequest"]["properties"]["ttl_seconds"]
    assert ttl["maximum"] == 315360000 == 10 * 365 * 86400
    capped = build_openapi(max_secret_bytes=10, max_body_bytes=100, max_ttl_seconds=60)
    assert capped["components"]["schemas"]["CreateRequest"]["properties"]["ttl_seconds"] == {
        **ttl,
        "maximum": 60,
    }


def test_spec_describes_the_new_answer_fields(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("CreateResponse", "FetchResponse"):
        properties = schemas[name]["properties"]
        assert properties["expires_at"]["type"] == "string"
        assert properties["expires_at"]["format"] == "date-time"
        assert properties["reads_left"]["type"] == "integer"
        # Present only when the secret expires or is read-limited: old answers are unchanged.
        assert "expires_at" not in schemas[name]["required"]
        assert "reads_left" not in schemas[name]["required"]
    assert schemas["CreateResponse"]["properties"]["reads_left"]["minimum"] == 1
    assert schemas["FetchResponse"]["properties"]["reads_left"]["minimum"] == 0
    utc = re.compile(schemas["FetchResponse"]["properties"]["expires_at"]["pattern"])
    assert utc.match("2026-12-01T15:04:05Z")
    for other in ("2026-12-01T15:04:05.5Z", "2026-12-01T15:04:05+00:00", "2026-12-01 15:04:05Z"):
        assert not utc.match(other), other


def test_create_links_its_id_into_fetch_and_delete(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation_ids = {
        operation["operationId"]
        for methods in spec["paths"].values()
        for operation in methods.values()
    }
    links = spec["paths"]["/vault/secret/create/"]["post"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in links.values()} == {"fetchSecret", "deleteSecret"}
    for link in links.values():
        assert link["operationId"] in operation_ids
        assert link["requestBody"] == {"secret_id": "$response.body#/secret_id"}


def test_the_documented_ranges_are_what_the_server_accepts(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(SECRET_MAX_TTL_SECONDS="3600")
    properties = client.get("/openapi.json").json()["components"]["schemas"]["CreateRequest"][
        "properties"
    ]
    for field in ("ttl_seconds", "max_reads"):
        low, high = properties[field]["minimum"], properties[field]["maximum"]
        probes: list[object] = [low - 1, low, high, high + 1, -1, 1.0, 2.5, True, "5", None]
        for value in probes:
            answer = client.post("/vault/secret/create", json={"secret": "aGk=", field: value})
            documented = type(value) is int and low <= value <= high
            assert answer.status_code == (200 if documented else 400), (field, value)
            if not documented:
                assert field in answer.json()["detail"], (field, value)


def test_spec_describes_the_passphrase_its_403_and_its_wrong_tries(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("CreateRequest", "FetchRequest"):
        passphrase = schemas[name]["properties"]["passphrase"]
        assert (passphrase["type"], passphrase["minLength"], passphrase["maxLength"]) == (
            "string",
            1,
            1024,
        )
        assert "passphrase" not in schemas[name]["required"]
    locked = spec["paths"]["/vault/secret/fetch"]["post"]["responses"]["403"]
    assert locked["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "PASSPHRASE_MAX_ATTEMPTS" in locked["description"]
    status = schemas["StatusResponse"]
    assert status["properties"]["passphrase_failures"] == {
        "type": "integer",
        "minimum": 0,
        "description": status["properties"]["passphrase_failures"]["description"],
    }
    # Only for a secret with a passphrase: a status of any other is as it was.
    assert "passphrase_failures" not in status["required"]


def test_the_documented_passphrase_lengths_are_what_the_server_accepts(
    client: TestClient,
) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    low, high = (
        schemas["CreateRequest"]["properties"]["passphrase"][k] for k in ("minLength", "maxLength")
    )
    assert schemas["FetchRequest"]["properties"]["passphrase"]["maxLength"] == high
    unknown = "00000000-0000-4000-8000-000000000000"
    probes: list[object] = ["", "p" * low, "\u00e9" * high, "p" * (high + 1), 5, None, ["p"]]
    for value in probes:
        documented = isinstance(value, str) and low <= len(value) <= high
        # A fetch of an unknown id checks the field before it asks the store: no derivation.
        fetched = client.post(
            "/vault/secret/fetch", json={"secret_id": unknown, "passphrase": value}
        )
        assert fetched.status_code == (404 if documented else 400), value
        if not documented:
            assert "passphrase" in fetched.json()["detail"]
    for value in ("", "p" * (high + 1), 5):
        made = client.post("/vault/secret/create", json={"secret": "aGk=", "passphrase": value})
        assert made.status_code == 400 and "passphrase" in made.json()["detail"], value
    made = client.post("/vault/secret/create", json={"secret": "aGk=", "passphrase": "p" * high})
    assert made.status_code == 200
