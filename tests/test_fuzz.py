"""schemathesis against the service's own /openapi.json, on a real server for each store.

Every operation of the document is exercised with its examples, the coverage phase's edge
cases (wrong methods, missing bodies, unsupported media types, each field at and past its
bounds) and generated valid and invalid bodies; then a stateful run follows the document's
links from create to fetch and delete, so expiring, read-limited and deleted secrets are
met too. Every response must be documented (status, content type, body schema, headers),
no request may get a server error, and every /vault answer must keep the response hygiene
docs/api.md promises.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.conftest import ServerProcess, b64
from vault.crypto import generate_key
from vault.settings import DEFAULT_MAX_TTL_SECONDS, MAX_READS
from vault.validation import MAX_PASSPHRASE

pytestmark = pytest.mark.slow

# Per operation and generation mode; the whole module stays well under a minute.
MAX_EXAMPLES = 25
API_KEY = "k" * 40  # of the guarded server: key "fuzz", every scope
CREATE_ONLY_KEY = "c" * 40  # its key "fuzz-writer", scope create only
# The document lists each secret operation once; the other spelling of its path answers the
# same, and every case generated for an operation is sent to both spellings.
OTHER_SPELLING = {
    "/vault/secret/create/": "/vault/secret/create",
    "/vault/secret/fetch": "/vault/secret/fetch/",
    "/vault/secret/delete": "/vault/secret/delete/",
    "/vault/secret/status": "/vault/secret/status/",
}
DOCUMENTED = {other: path for path, other in OTHER_SPELLING.items()}


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
        env["API_KEYS"] = f"fuzz:{API_KEY},fuzz-writer:{CREATE_ONLY_KEY}:create"
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


# What the fuzzer sent and got, per server (url): read back by the test after it, which
# shows that the run reached the lifecycle and did not only pass by missing it.
SENT: dict[str, Counter[str]] = {}
LIFECYCLE_FIELDS = {"ttl_seconds": DEFAULT_MAX_TTL_SECONDS, "max_reads": MAX_READS}


def _record(server: ServerProcess, case: schemathesis.Case, status: int) -> None:
    seen = SENT.setdefault(server.url, Counter())
    seen[f"{case.path} {status}"] += 1
    if isinstance(case.body, dict):
        for field, maximum in LIFECYCLE_FIELDS.items():
            if field in case.body:
                value = case.body[field]
                valid = type(value) is int and 1 <= value <= maximum
                seen[f"{field} {'valid' if valid else 'invalid'}"] += 1
        if "passphrase" in case.body and "status" not in case.path:
            value = case.body["passphrase"]
            valid = isinstance(value, str) and 1 <= len(value) <= MAX_PASSPHRASE
            operation = "create" if "create" in case.path else "fetch"
            seen[f"{operation} passphrase {'valid' if valid else 'invalid'}"] += 1


def _fresh_idempotency_key(case: schemathesis.Case) -> None:
    """A generated Idempotency-Key is well formed but may repeat one generated before with
    another body, which the server rightly refuses (422): in a case meant to be valid it is
    replaced by a fresh one. A negative case keeps its own (it may be what is invalid)."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive and case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = str(uuid.uuid4())


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None)
def test_api_conforms_to_its_openapi_document(
    case: schemathesis.Case, fuzz_server: ServerProcess
) -> None:
    # All of schemathesis's checks: not_a_server_error, status_code_conformance,
    # content_type_conformance, response_schema_conformance, response_headers_conformance,
    # negative_data_rejection, positive_data_acceptance, unsupported_method, ...
    _fresh_idempotency_key(case)
    response = case.call(timeout=10)
    _record(fuzz_server, case, response.status_code)
    case.validate_response(response)
    assert_hygiene(response, case.operation.path)
    other = OTHER_SPELLING.get(case.operation.path)
    if other is not None:  # the same request at the other spelling: the same answers
        alias = case.derive(keep_auth=True)
        alias.path = other
        response = alias.call(timeout=10)
        _record(fuzz_server, alias, response.status_code)
        alias.validate_response(response)
        assert_hygiene(response, other)


def test_the_fuzzer_sent_delete_and_the_lifecycle_fields(fuzz_server: ServerProcess) -> None:
    """After the run above on this server: each delete spelling was called, creates
    carried ttl_seconds and max_reads both in range (accepted) and out of it (refused), and
    creates and fetches a passphrase of a valid length and of an invalid one."""
    seen = SENT.get(fuzz_server.url)
    if seen is None:
        pytest.skip("the schemathesis run was not selected")
    for path in ("/vault/secret/delete", "/vault/secret/delete/"):
        assert any(key.startswith(path + " ") for key in seen), sorted(seen)
    for field in LIFECYCLE_FIELDS:
        assert seen[f"{field} valid"] > 0 and seen[f"{field} invalid"] > 0, sorted(seen)
    for operation in ("create", "fetch"):
        for validity in ("valid", "invalid"):
            assert seen[f"{operation} passphrase {validity}"] > 0, sorted(seen)


def test_lifecycle_workflows_conform_to_its_openapi_document(fuzz_server: ServerProcess) -> None:
    """schemathesis's stateful run: create, then fetch and delete the id it answered (the
    document's links), in generated orders, so expiring, read-limited, used-up and deleted
    secrets answer too, each answer checked against the document."""
    # On the guarded server the key is configured, so schemathesis knows calls carry it.
    headers = {"Authorization": f"Bearer {API_KEY}"} if "API_KEYS" in fuzz_server.env else {}
    # Given as the document's bearer scheme's credentials (not as a bare header), so that
    # schemathesis counts them as configured auth even in a case with generated headers.
    auth = {"openapi": {"apiKey": {"bearer": API_KEY}}} if headers else {}
    config = SchemathesisConfig.from_dict({"auth": auth} if auth else {})
    workflow_schema = schemathesis.openapi.from_url(
        fuzz_server.url + "/openapi.json", config=config
    )
    statuses: Counter[str] = Counter()
    passphrases: dict[str, str] = {}  # secret id -> the passphrase it was created with

    class Workflow(workflow_schema.as_state_machine()):
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"timeout": 10}

        def before_call(self, case: schemathesis.Case) -> None:
            super().before_call(case)
            _fresh_idempotency_key(case)
            # Generated readers are well formed but name no configured key, which the server
            # refuses (400: a typo must not lock a secret away); the document cannot list a
            # server's key names, so a generated list is replaced by the one key there is.
            # Only in a case meant to be valid: in a negative one the readers may be what
            # makes it invalid, and must reach the server as generated.
            body = case.body
            positive = case.meta is not None and case.meta.generation.mode.is_positive
            if positive and isinstance(body, dict) and isinstance(body.get("readers"), list):
                body["readers"] = ["fuzz"]
            # Likewise a generated passphrase on a fetch following the link from a create
            # made with one: the secret's own, so the link leads to the secret (a fetch
            # without one meets the documented 403; a wrong one is checked below).
            if positive and isinstance(body, dict) and "passphrase" in body:
                known = passphrases.get(str(body.get("secret_id")))
                if known is not None and "fetch" in case.operation.path:
                    body["passphrase"] = known

        def after_call(self, response: schemathesis.Response, case: schemathesis.Case) -> None:
            super().after_call(response, case)
            statuses[f"{case.operation.path} {response.status_code}"] += 1
            body = case.body
            made = response.status_code == 200 and "create" in case.operation.path
            if made and isinstance(body, dict) and isinstance(body.get("passphrase"), str):
                passphrases[json.loads(response.content)["secret_id"]] = body["passphrase"]
            if response.status_code == 200 and case.operation.path.startswith("/vault"):
                statuses[f"{case.operation.path} 200 {sorted(json.loads(response.content))}"] += 1
            assert_hygiene(response, case.operation.path)

    Workflow.run(
        settings=settings(
            max_examples=MAX_EXAMPLES, stateful_step_count=8, deadline=None, database=None
        )
    )
    # The links were followed to a secret that was there: fetched, and deleted.
    assert any(k.startswith("/vault/secret/fetch 200 ") for k in statuses), sorted(statuses)
    assert any(k.startswith("/vault/secret/delete 200 ") for k in statuses), sorted(statuses)


# --- the answers the fuzzer rarely reaches, checked against the document too ----------------


def _documented(api_schema: OpenApiSchema, path: str, response: httpx.Response) -> None:
    case = api_schema[DOCUMENTED.get(path, path)]["POST"].Case(body={})
    # The status is documented for the operation, and so are the content type, the body
    # and the headers.
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


def test_every_lifecycle_answer_is_documented(
    api_schema: OpenApiSchema, fuzz_server: ServerProcess
) -> None:
    """One of each, whatever the fuzzer happened to reach: an expiring read-limited create,
    its fetches until it is used up, and a delete before and after."""
    headers = {"Authorization": f"Bearer {API_KEY}"} if "API_KEYS" in fuzz_server.env else {}
    with httpx.Client(base_url=fuzz_server.url, headers=headers, timeout=10) as client:

        def post(path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
            response = client.post(path, json=body)
            assert response.status_code == status, (path, body, response.text)
            _documented(api_schema, path, response)
            answer = response.json()
            assert isinstance(answer, dict)
            return answer

        secret = {"secret": b64(b"one time"), "ttl_seconds": 3600, "max_reads": 2}
        created = post("/vault/secret/create/", secret, 200)
        assert set(created) == {"secret_id", "expires_at", "reads_left"}
        secret_id = {"secret_id": created["secret_id"]}
        assert post("/vault/secret/fetch", secret_id, 200)["reads_left"] == 1
        assert post("/vault/secret/fetch/", secret_id, 200)["reads_left"] == 0
        post("/vault/secret/fetch", secret_id, 404)
        post("/vault/secret/delete", secret_id, 404)

        if "API_KEYS" in fuzz_server.env:  # readers, and a key without the scope (403)
            named = post("/vault/secret/create", {"secret": b64(b"r"), "readers": ["fuzz"]}, 200)
            assert set(named) == {"secret_id", "readers"}
            fetched = post("/vault/secret/fetch", {"secret_id": named["secret_id"]}, 200)
            assert fetched["readers"] == ["fuzz"]
            post("/vault/secret/create", {"secret": b64(b"r"), "readers": ["nobody"]}, 400)
            client.headers["Authorization"] = f"Bearer {CREATE_ONLY_KEY}"
            post("/vault/secret/fetch", {"secret_id": named["secret_id"]}, 403)
            post("/vault/secret/delete", {"secret_id": named["secret_id"]}, 403)
            client.headers["Authorization"] = f"Bearer {API_KEY}"

        # An idempotent create, its replay, and its key reused for another body.
        key = {"Idempotency-Key": str(uuid.uuid4())}
        body = {"secret": b64(b"retried")}
        first = client.post("/vault/secret/create", json=body, headers=key)
        replay = client.post("/vault/secret/create/", json=body, headers=key)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == first.content
        reused = client.post("/vault/secret/create", json={"secret": b64(b"other")}, headers=key)
        assert reused.status_code == 422
        for response in (first, replay, reused):
            _documented(api_schema, "/vault/secret/create", response)

        # A receipt, and its status before and after the secret ends.
        receipted = post("/vault/secret/create", {"secret": b64(b"r"), "receipt": True}, 200)
        assert set(receipted) == {"secret_id", "receipt_id"}
        receipt = {"receipt_id": receipted["receipt_id"]}
        assert post("/vault/secret/status", receipt, 200)["state"] == "active"
        post("/vault/secret/delete/", {"secret_id": receipted["secret_id"]}, 200)
        assert post("/vault/secret/status/", receipt, 200)["state"] == "deleted"
        post("/vault/secret/status", {"receipt_id": "00000000-0000-4000-8000-000000000000"}, 404)

        # A secret under a passphrase: refused without it and with a wrong one (its tries
        # counted by the status), served with it.
        locked = post(
            "/vault/secret/create",
            {"secret": b64(b"locked"), "passphrase": "open sesame", "receipt": True},
            200,
        )
        assert set(locked) == {"secret_id", "receipt_id"}
        secret_id = {"secret_id": locked["secret_id"]}
        assert "passphrase" in post("/vault/secret/fetch", secret_id, 403)["detail"]
        wrong = post("/vault/secret/fetch/", {**secret_id, "passphrase": "open sesame!"}, 403)
        assert "wrong" in wrong["detail"]
        status = post("/vault/secret/status", {"receipt_id": locked["receipt_id"]}, 200)
        assert status["passphrase_failures"] == 1
        opened = post("/vault/secret/fetch", {**secret_id, "passphrase": "open sesame"}, 200)
        assert opened["secret"] == b64(b"locked")

        kept = post("/vault/secret/create", {"secret": b64(b"kept")}, 200)
        assert set(kept) == {"secret_id"}
        deleted = post("/vault/secret/delete/", kept, 200)
        assert deleted == {"secret_id": kept["secret_id"], "deleted": True}
        post("/vault/secret/delete", kept, 404)
        post("/vault/secret/fetch", kept, 404)


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
    "delete of an unknown id": (
        "/vault/secret/delete",
        b'{"secret_id": "00000000-0000-4000-8000-000000000000"}',
        {"Content-Type": "application/json"},
        404,
    ),
    "delete of a malformed id": (
        "/vault/secret/delete/",
        b'{"secret_id": "/vault/secret/delete?id=1"}',
        {"Content-Type": "application/json"},
        400,
    ),
    "form content type on delete": (
        "/vault/secret/delete",
        b"secret_id=00000000-0000-4000-8000-000000000000",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
    ),
    "ttl_seconds as a float": (
        "/vault/secret/create/",
        b'{"secret": "aGk=", "ttl_seconds": 60.0}',
        {"Content-Type": "application/json"},
        400,
    ),
    "ttl_seconds past the cap": (
        "/vault/secret/create",
        b'{"secret": "aGk=", "ttl_seconds": %d}' % (DEFAULT_MAX_TTL_SECONDS + 1),
        {"Content-Type": "application/json"},
        400,
    ),
    "max_reads as a boolean": (
        "/vault/secret/create",
        b'{"secret": "aGk=", "max_reads": true}',
        {"Content-Type": "application/json"},
        400,
    ),
    "max_reads of zero": (
        "/vault/secret/create/",
        b'{"secret": "aGk=", "max_reads": 0}',
        {"Content-Type": "application/json"},
        400,
    ),
    "empty passphrase": (
        "/vault/secret/create",
        b'{"secret": "aGk=", "passphrase": ""}',
        {"Content-Type": "application/json"},
        400,
    ),
    "passphrase past its length": (
        "/vault/secret/create/",
        b'{"secret": "aGk=", "passphrase": "%s"}' % (b"p" * (MAX_PASSPHRASE + 1)),
        {"Content-Type": "application/json"},
        400,
    ),
    "passphrase as a number on fetch": (
        "/vault/secret/fetch",
        b'{"secret_id": "00000000-0000-4000-8000-000000000000", "passphrase": 1234}',
        {"Content-Type": "application/json"},
        400,
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
    _documented(api_schema, path, response)


def test_the_server_logged_no_error_and_no_traceback(fuzz_server: ServerProcess) -> None:
    """Last in the module: after everything above ran against this same server."""
    with httpx.Client(base_url=fuzz_server.url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
    output = fuzz_server.output()
    assert "Traceback" not in output
    assert '"level": "ERROR"' not in output, output[-2000:]
