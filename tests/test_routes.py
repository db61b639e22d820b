"""vault/routes.py through the whole app, in process, against both stores."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import uuid
from collections.abc import Callable

import pytest
from starlette.testclient import TestClient

from observability.logging import JsonFormatter
from tests.conftest import RawRecords, b64

CREATE_PATHS = ["/vault/secret/create/", "/vault/secret/create"]
FETCH_PATHS = ["/vault/secret/fetch", "/vault/secret/fetch/"]


def create(client: TestClient, data: bytes, path: str = "/vault/secret/create/") -> str:
    response = client.post(path, json={"secret": b64(data)})
    assert response.status_code == 200, response.text
    return str(response.json()["secret_id"])


def fetch(client: TestClient, secret_id: str, path: str = "/vault/secret/fetch") -> bytes:
    response = client.post(path, json={"secret_id": secret_id})
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["secret"])


@pytest.mark.parametrize("create_path", CREATE_PATHS)
@pytest.mark.parametrize("fetch_path", FETCH_PATHS)
def test_round_trip_on_every_spelling_without_redirect(
    client: TestClient, create_path: str, fetch_path: str
) -> None:
    data = os.urandom(100)
    response = client.post(create_path, json={"secret": b64(data)}, follow_redirects=False)
    assert response.status_code == 200
    assert set(response.json()) == {"secret_id"}
    secret_id = response.json()["secret_id"]
    assert uuid.UUID(secret_id).version == 4
    assert str(uuid.UUID(secret_id)) == secret_id
    fetched = client.post(fetch_path, json={"secret_id": secret_id}, follow_redirects=False)
    assert fetched.status_code == 200
    assert fetched.json() == {"secret": b64(data)}


def test_each_create_gets_a_new_id(client: TestClient) -> None:
    ids = {create(client, b"same bytes") for _ in range(5)}
    assert len(ids) == 5
    assert all(fetch(client, i) == b"same bytes" for i in ids)


def test_largest_secret_fits_and_one_byte_more_is_413(client: TestClient) -> None:
    largest = os.urandom(65536)
    assert fetch(client, create(client, largest)) == largest
    response = client.post("/vault/secret/create", json={"secret": b64(largest + b"x")})
    assert response.status_code == 413
    assert "65536" in response.json()["detail"]


def test_max_secret_bytes_is_configurable(make_client: Callable[..., TestClient]) -> None:
    small = make_client(MAX_SECRET_BYTES="16")
    assert small.post("/vault/secret/create", json={"secret": b64(b"x" * 16)}).status_code == 200
    assert small.post("/vault/secret/create", json={"secret": b64(b"x" * 17)}).status_code == 413


def test_body_over_the_cap_is_413_json(client: TestClient) -> None:
    body = json.dumps({"secret": "A" * 200_000}).encode()
    response = client.post("/vault/secret/create", content=body)
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]


def test_chunked_body_over_the_cap_is_413(client: TestClient) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"secret": "'
        for _ in range(100):
            yield b"A" * 4096

    response = client.post("/vault/secret/create", content=chunks())
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "JSON"),
        (b"not json", "JSON"),
        (b"\xff\xfe\xfa", "JSON"),
        (b'"a string"', "JSON object"),
        (b"[1, 2]", "JSON object"),
        (b"null", "JSON object"),
        (b"{}", "'secret' is missing"),
        (b'{"secret": 5}', "must be a string"),
        (b'{"secret": null}', "must be a string"),
        (b'{"secret": ""}', "empty"),
        (b'{"secret": "aGk"}', "padding"),
        (b'{"secret": "aGVs\\nbG8="}', "base64"),
        (b'{"secret": "-_-_"}', "base64"),
        (b'{"secret": "aGk=", "secret": "aGk="}', "duplicate"),
        (b"[" * 100_000, "JSON"),
    ],
)
def test_bad_create_requests_are_400_and_store_nothing(
    client: TestClient, raw_records: RawRecords, body: bytes, needle: str
) -> None:
    before = raw_records.record_keys()
    response = client.post("/vault/secret/create", content=body)
    assert response.status_code == 400
    assert needle in response.json()["detail"]
    assert raw_records.record_keys() == before


# What a body got wrong, in words a caller can act on; each cause names itself, not another.
BODY_FAULTS = {
    "not valid JSON": b"hello",
    "duplicate key": b'{"secret": "aGk=", "secret": "aGk="}',
    "not UTF-8": b'{"secret": "\xff"}',
    "NaN": b'{"secret": NaN}',
}


@pytest.mark.parametrize("fault", list(BODY_FAULTS))
def test_a_malformed_body_is_told_what_is_wrong_with_it(client: TestClient, fault: str) -> None:
    response = client.post(
        "/vault/secret/create",
        content=BODY_FAULTS[fault],
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert fault in detail
    assert not [other for other in BODY_FAULTS if other != fault and other in detail], detail


def test_a_refused_charset_is_named_and_utf8_asked_for(client: TestClient) -> None:
    response = client.post(
        "/vault/secret/create",
        content='{"secret": "aGk="}'.encode("latin-1"),
        headers={"Content-Type": "application/json; charset=latin-1"},
    )
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert "'latin-1'" in detail and "UTF-8" in detail, detail
    assert "Content-Type: application/json" in detail


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"secret_id": 12},
        {"secret_id": "abc"},
        {"secret_id": uuid.uuid4().hex},
        {"secret_id": "{" + str(uuid.uuid4()) + "}"},
        {"id": str(uuid.uuid4())},
    ],
)
def test_bad_fetch_requests_are_400(client: TestClient, payload: dict[str, object]) -> None:
    response = client.post("/vault/secret/fetch", json=payload)
    assert response.status_code == 400
    assert response.json()["detail"]


def test_unknown_id_is_404(client: TestClient) -> None:
    response = client.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
    assert response.status_code == 404
    assert "secret_id" in response.json()["detail"]


def test_upper_case_id_finds_the_secret(client: TestClient) -> None:
    secret_id = create(client, b"case")
    assert fetch(client, secret_id.upper()) == b"case"


def test_responses_with_secret_material_are_not_cacheable(client: TestClient) -> None:
    created = client.post("/vault/secret/create", json={"secret": b64(b"x")})
    fetched = client.post("/vault/secret/fetch", json={"secret_id": created.json()["secret_id"]})
    for response in (created, fetched):
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-type"] == "application/json"


def test_errors_are_json_with_detail(client: TestClient) -> None:
    for response, status in (
        (client.get("/vault/secret/create"), 405),
        (client.post("/no/such/path", json={}), 404),
        (client.post("/vault/secret/fetch", content=b"{"), 400),
    ):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()) == {"detail"}


def test_request_id_is_returned_and_a_callers_well_formed_one_kept(client: TestClient) -> None:
    generated = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)  # 128 random bits in hex
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    hostile = client.get("/healthz", headers={"X-Request-ID": "a\tb" + "x" * 300})
    # Not echoed (it could forge log lines): replaced by a new one, as if none was sent.
    replaced = hostile.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)
    assert replaced != generated


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "records_unreadable": 0}


def test_plaintext_never_reaches_the_store(client: TestClient, raw_records: RawRecords) -> None:
    marker = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    secret_id = create(client, marker)
    dump = raw_records.dump()
    assert marker not in dump
    assert b64(marker).encode() not in dump
    record = raw_records.get(secret_id)
    assert len(record["nonce"]) == 12
    assert len(record["ciphertext"]) == len(marker) + 16  # GCM tag


def _json_log_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records]


def test_tampered_ciphertext_is_a_generic_500_with_a_safe_log_line(
    client: TestClient, raw_records: RawRecords, caplog: pytest.LogCaptureFixture
) -> None:
    secret = b"tamper-target-" + os.urandom(4).hex().encode()
    secret_id = create(client, secret)
    record = raw_records.get(secret_id)
    flipped = bytearray(record["ciphertext"])
    flipped[0] ^= 0x01
    raw_records.put(secret_id, {**record, "ciphertext": bytes(flipped)})

    caplog.set_level(logging.INFO)
    response = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
    assert response.status_code == 500
    assert set(response.json()) == {"detail"}
    request_id = response.headers["x-request-id"]
    for text in (response.text, caplog.text):
        assert secret.decode() not in text
        assert b64(secret) not in text
        assert secret_id not in text
        assert "Traceback" not in text
    errors = [line for line in _json_log_lines(caplog) if line["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == request_id
    assert "DecryptionFailed" in str(errors[0]["message"])


def test_ciphertext_swapped_between_records_never_yields_the_other_secret(
    client: TestClient, raw_records: RawRecords
) -> None:
    alice = create(client, b"alice's password")
    mallory = create(client, b"mallory's junk")
    raw_records.put(mallory, raw_records.get(alice))
    response = client.post("/vault/secret/fetch", json={"secret_id": mallory})
    assert response.status_code == 500
    assert b64(b"alice's password") not in response.text
    assert fetch(client, alice) == b"alice's password"


@pytest.mark.parametrize("field", ["nonce", "key_id"])
def test_tampered_nonce_or_key_id_is_500(
    client: TestClient, raw_records: RawRecords, field: str
) -> None:
    secret_id = create(client, b"data")
    record = raw_records.get(secret_id)
    value = record[field]
    record[field] = bytes([value[0] ^ 1]) + value[1:] if field == "nonce" else "0" * 16
    raw_records.put(secret_id, record)
    assert client.post("/vault/secret/fetch", json={"secret_id": secret_id}).status_code == 500


def test_a_secret_survives_an_app_restart(make_client: Callable[..., TestClient]) -> None:
    first = make_client()
    secret_id = create(first, b"durable")
    first.__exit__(None, None, None)
    second = make_client()
    assert fetch(second, secret_id) == b"durable"


def test_two_app_instances_share_one_store(make_client: Callable[..., TestClient]) -> None:
    one, two = make_client(), make_client()
    assert fetch(two, create(one, b"from one")) == b"from one"
    assert fetch(one, create(two, b"from two")) == b"from two"


def test_old_key_still_opens_after_rotation(
    make_client: Callable[..., TestClient], master_key: str
) -> None:
    from vault.crypto import generate_key

    before = make_client()
    old_secret = create(before, b"sealed by the old key")
    new_key = generate_key()
    rotated = make_client(MASTER_KEY=new_key, MASTER_KEY_PREVIOUS=master_key)
    assert fetch(rotated, old_secret) == b"sealed by the old key"
    new_secret = create(rotated, b"sealed by the new key")
    only_new = make_client(MASTER_KEY=new_key)
    assert fetch(only_new, new_secret) == b"sealed by the new key"
    assert only_new.post("/vault/secret/fetch", json={"secret_id": old_secret}).status_code == 500


def test_unknown_paths_and_wrong_methods_say_what_to_do(client: TestClient) -> None:
    unknown = client.post("/vault/secret/list", json={})
    assert unknown.status_code == 404
    assert unknown.json() == {
        "detail": "no such path: this service answers POST /vault/secret/create/, "
        "POST /vault/secret/fetch, POST /vault/secret/delete and POST /vault/secret/status "
        "(GET /docs describes them all)"
    }

    wrong = client.get("/vault/secret/create/")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.json() == {"detail": "GET is not allowed on this path; use POST"}

    probe = client.delete("/healthz")
    assert probe.status_code == 405
    assert probe.json() == {"detail": "DELETE is not allowed on this path; use GET"}

    # A 404 of the API itself keeps its own words.
    missing = client.post("/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
    assert missing.json()["detail"].startswith("no secret has this secret_id")
