"""observability/audit.py: the record the middleware makes and the stores write."""

from __future__ import annotations

import dataclasses
import json
import re

from tests.conftest import audit_record
from vault.stores.base import AUDIT_FIELDS


def test_document_has_exactly_the_fields_the_stores_take() -> None:
    # The middleware and the stores both name this record: its document is what they store.
    assert tuple(audit_record("r1").as_document()) == AUDIT_FIELDS


def test_record_id_is_fixed_at_creation_and_unique() -> None:
    record = audit_record("r1")
    assert re.fullmatch(r"[0-9a-f]{24}", record.record_id)  # an ObjectId's hex
    assert record.as_document()["record_id"] == record.as_document()["record_id"]
    assert len({audit_record("r1").record_id for _ in range(1000)}) == 1000


def test_json_line_is_utc_with_a_z_and_carries_the_record_id() -> None:
    record = audit_record("r1")
    line = json.loads(record.as_json())
    assert line["ts"].endswith("Z") and "+00:00" not in line["ts"]
    assert line["record_id"] == record.record_id
    assert line["request_id"] == "r1"


def test_answered_restamps_the_answer_and_keeps_every_other_field() -> None:
    record = dataclasses.replace(
        audit_record("r1"),
        secret_id_hmac="ab" * 32,
        user_agent="curl/8",
        api_key_name="ci",
        tenant="acme",
        started=1.0,
    )
    answered = record.answered(404, "expired")
    assert (answered.status, answered.outcome) == (404, "expired")
    stamped = {"ts", "status", "outcome", "latency_ms"}
    for field in dataclasses.fields(record):
        if field.name not in stamped:
            assert getattr(answered, field.name) == getattr(record, field.name), field.name
    assert answered.ts >= record.ts
    assert record.answered(200).outcome == "success"
