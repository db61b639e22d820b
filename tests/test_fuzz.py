"""schemathesis against the service's own /openapi.json, on a real server for each store.

Every operation of the document is exercised with its examples, the coverage phase's edge
cases (wrong methods, missing bodies, unsupported media types) and generated valid and
invalid bodies. Every response must be documented (status, content type, body schema,
headers), no request may get a server error, and every /vault answer must keep the
response hygiene docs/api.md promises.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.conftest import ServerProcess, b64
from vault.crypto import generate_key

pytestmark = pytest.mark.slow

# Per operation and generation mode; the whole module stays well under a minute.
MAX_EXAMPLES = 25
API_KEY = "k" * 40  # of the guarded server


@pytest.fixture(scope="module", params=["sqlite", "mongo", "sqlite-guarded"])
def fuzz_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A real server per store; rate limiting off so the fuzzer measures the API, not 429s.

    ``sqlite-guarded`` has API keys and a metrics token, and the fuzzer sends no token: its
    401s must be the documented ones.
    """
    directory = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    env = {
        "MASTER_KEY": generate_key(),
        "DATA_DIR": str(directory / "data"),
        "RATE_LIMIT": "off",
        "MAX_SECRET_BYTES": "1024",
    }
    if request.param == "sqlite-guarded":
        env["API_KEYS"] = "fuzz:" + API_KEY
        env["METRICS_TOKEN"] = "m" * 40
    if request.param == "mongo":
        env["MONGO_URI"] = request.getfixturevalue("mongo_uri")
        env["MONGO_DB"] = "t" + uuid.uuid4().hex[:16]
    server = ServerProcess(env, [], directory)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess) -> OpenApiSchema:
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def assert_hygiene(response: schemathesis.Response, path: str) -> None:
    headers = response.headers  # lower-case names, lists of values
    if path.startswith("/vault"):
        assert headers.get("cache-control") == ["no-store"], headers
        assert headers.get("x-content-type-options") == ["nosniff"], headers
    assert "server" not in headers, headers
    text = response.content.decode("utf-8", "replace")
    assert "Traceback" not in text and 'File "' not in text, text


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case) -> None:
    # All of schemathesis's checks: not_a_server_error, status_code_conformance,
    # content_type_conformance, response_schema_conformance, response_headers_conformance,
    # negative_data_rejection, positive_data_acceptance, unsupported_method, ...
    response = case.call_and_validate(timeout=10)
    assert_hygiene(response, case.operation.path)


# --- the answers the fuzzer rarely reaches, checked against the document too ----------------


HOSTILE_REQUESTS: dict[str, tuple[str, bytes, dict[str, str], int]] = {
    # name: (path, body, headers, expected status)
    "wrong content type": (
        "/vault/secret/create",
        b'{"secret": "aGk="}',
        {"Content-Type": "text/plain"},
        415,
    ),
    "form content type on fetch": (
        "/vault/secret/fetch",
        b'{"secret_id": "00000000-0000-4000-8000-000000000000"}',
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
    ),
    "body over the cap": (
        "/vault/secret/create",
        b'{"secret": "' + b"A" * 200_000 + b'"}',
        {"Content-Type": "application/json"},
        413,
    ),
    "secret over MAX_SECRET_BYTES": (
        "/vault/secret/create",
        b'{"secret": "' + b64(bytes(1025)).encode() + b'"}',
        {"Content-Type": "application/json"},
        413,
    ),
    "not JSON": ("/vault/secret/create", b"{", {"Content-Type": "application/json"}, 400),
    "unknown id": (
        "/vault/secret/fetch",
        b'{"secret_id": "00000000-0000-4000-8000-000000000000"}',
        {"Content-Type": "application/json"},
        404,
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_REQUESTS))
def test_hostile_answers_are_documented(
    api_schema: OpenApiSchema, fuzz_server: ServerProcess, name: str
) -> None:
    path, body, headers, expected = HOSTILE_REQUESTS[name]
    if "API_KEYS" in fuzz_server.env:  # past the key check, to the answer under test
        headers = {**headers, "Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(fuzz_server.url + path, content=body, headers=headers, timeout=10)
    assert response.status_code == expected, response.text
    case = api_schema[path]["POST"].Case(body={})
    # The status is documented for the operation, and so are the content type, the body
    # (the Error schema) and the headers.
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
        ],
    )
    assert_hygiene(schemathesis.Response.from_any(response), path)


def test_the_server_logged_no_error_and_no_traceback(fuzz_server: ServerProcess) -> None:
    """Last in the module: after everything above ran against this same server."""
    with httpx.Client(base_url=fuzz_server.url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
    output = fuzz_server.output()
    assert "Traceback" not in output
    assert '"level": "ERROR"' not in output, output[-2000:]
