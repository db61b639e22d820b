"""Receipts and labels through ``secret-manager export`` and ``import``, on both stores.

Secrets are made with receipts through the service; the files are carried by the real
commands; what each store then holds is read back through its own interfaces (the serving
store's ``receipt``, the bulk store's records and receipts).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from starlette.testclient import TestClient

from tests.conftest import b64, on_store
from tests.test_transfer import (
    EXPORT_FIELDS,
    OLD_AUDIT_LINE,
    a_secret_line,
    cli,
    export_file,
    lines,
    other_store,
    secret_lines,
    store_is_untouched,
    summary_counts,
    without_keys,
)
from vault import transfer
from vault.app import create_app
from vault.backend import backend_for
from vault.errors import TransferRefused
from vault.records import Receipt, ReceiptState, SealedSecret, receipt_key, record_key
from vault.settings import Settings
from vault.stores.base import BulkStore, SecretStore

RECEIPT_LINE_FIELDS = {"type", *transfer.RECEIPT_FIELDS}


def receipt_counts(summary: str) -> tuple[int, int]:
    """The import summary's receipts: new, and already there."""
    tail = summary.split("; receipts ", 1)[1]
    new, _, rest = tail.partition(" new, ")
    return int(new), int(rest.split(" already there", 1)[0])


def stored_receipt(env: dict[str, str], receipt_id: str) -> Receipt | None:
    """The receipt the store ``env`` names holds for ``receipt_id``, read by the serving
    store's own ``receipt``."""

    async def read(store: SecretStore) -> Receipt | None:
        return await store.receipt(receipt_id)

    found: Receipt | None = on_store(env, read)
    return found


class Bulk:
    """The bulk store of ``env``, opened for one use."""

    def __init__(self, env: dict[str, str], *, create: bool = False) -> None:
        self.store: BulkStore = backend_for(Settings.from_env(env)).open_bulk(create=create)

    def __enter__(self) -> BulkStore:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def stored_records(env: dict[str, str]) -> dict[str, SealedSecret]:
    """Every live secret record of the store ``env`` names, by record key."""
    with Bulk(env) as bulk:
        return {r.sealed.record_key: r.sealed for r in bulk.secrets(dt.datetime.now(dt.UTC))}


@dataclasses.dataclass
class Made:
    """Secrets made through the service: the create's answer by a name for each."""

    answers: dict[str, dict[str, Any]]

    def receipt_ids(self) -> list[str]:
        return [a["receipt_id"] for a in self.answers.values() if "receipt_id" in a]


def make_secrets(client: TestClient) -> Made:
    """A receipt with a label and a read taken; one that expires; one used up and one deleted
    (their secrets ended, their receipts kept); a label without a receipt; a plain secret."""

    def create(**fields: Any) -> dict[str, Any]:
        answer = client.post("/vault/secret/create", json={"secret": b64(b"s3cret"), **fields})
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    answers = {
        "read": create(receipt=True, label="deploy token for ci", max_reads=3),
        "expiring": create(receipt=True, ttl_seconds=3600),
        "used up": create(receipt=True, label="once", max_reads=1),
        "deleted": create(receipt=True, label="gone"),
        "label only": create(label="no receipt"),
        "plain": create(),
    }
    for name in ("read", "used up"):
        fetched = client.post("/vault/secret/fetch", json={"secret_id": answers[name]["secret_id"]})
        assert fetched.status_code == 200
    deleted = client.post(
        "/vault/secret/delete", json={"secret_id": answers["deleted"]["secret_id"]}
    )
    assert deleted.status_code == 200
    return Made(answers)


@pytest.fixture
def made(make_client: Callable[..., TestClient]) -> Iterator[Made]:
    yield make_secrets(make_client())


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
def test_receipts_and_labels_go_to_mongodb_and_back_unchanged(
    made: Made,
    store_env: dict[str, str],
    tmp_path: Path,
    mongo_uri: str,
    make_client: Callable[..., TestClient],
) -> None:
    key = {"MASTER_KEY": store_env["MASTER_KEY"]}
    receipts = {rid: stored_receipt(store_env, rid) for rid in made.receipt_ids()}
    states = {n: receipts[a["receipt_id"]] for n, a in made.answers.items() if "receipt_id" in a}
    assert {name: getattr(r, "state", None) for name, r in states.items()} == {
        "read": ReceiptState.ACTIVE,
        "expiring": ReceiptState.ACTIVE,
        "used up": ReceiptState.USED_UP,
        "deleted": ReceiptState.DELETED,
    }
    records = stored_records(store_env)
    assert len(records) == 4  # the read, expiring, label-only and plain ones

    exported = cli(without_keys(store_env), "export", "--audit", "-o", "b.jsonl", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "; 4 receipts; SHA-256 " in exported.stderr.decode()
    data = (tmp_path / "b.jsonl").read_bytes()
    by_key = {line["record_key"]: line for line in secret_lines(data)}
    for name, answer in made.answers.items():
        if name in ("used up", "deleted"):
            assert record_key(answer["secret_id"]) not in by_key
            # An ended secret's receipt id is in no line: its receipt is named by its digest.
            assert answer["receipt_id"].encode() not in data
            continue
        line = by_key[record_key(answer["secret_id"])]
        sealed = records[record_key(answer["secret_id"])]
        assert set(line) - EXPORT_FIELDS == {
            name for name in ("receipt_id", "label") if getattr(sealed, name) is not None
        }
        assert (line.get("receipt_id"), line.get("label")) == (sealed.receipt_id, sealed.label)
    assert set(by_key[record_key(made.answers["plain"]["secret_id"])]) == EXPORT_FIELDS
    receipt_lines = [line for line in lines(data) if line.get("type") == "receipt"]
    assert all(set(line) == RECEIPT_LINE_FIELDS for line in receipt_lines)
    assert {line["receipt_key"] for line in receipt_lines} == {
        receipt_key(rid) for rid in made.receipt_ids()
    }
    end = lines(data)[-1]
    assert list(end) == ["type", "secrets", "receipts", "audit", "sha256"]
    assert (end["secrets"], end["receipts"]) == (4, 4)

    mongo = other_store("mongo", tmp_path, mongo_uri, "")
    imported = cli(mongo, "import", "-i", "b.jsonl", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert receipt_counts(imported.stderr.decode()) == (4, 0)
    again = cli(mongo, "import", "-i", "b.jsonl", cwd=tmp_path)
    assert receipt_counts(again.stderr.decode()) == (0, 4)

    back = {"DATA_DIR": str(tmp_path / "back")}
    to_mongo = cli(without_keys(mongo), "export", "--audit", cwd=tmp_path)
    assert to_mongo.returncode == 0, to_mongo.stderr
    home = cli(back, "import", cwd=tmp_path, stdin=to_mongo.stdout)
    assert home.returncode == 0, home.stderr
    assert receipt_counts(home.stderr.decode()) == (4, 0)

    for env in (mongo, back):
        # Each receipt as the source holds it, its secret ended or not; each record with
        # its receipt id and label.
        for rid, receipt in receipts.items():
            assert stored_receipt({**env, **key}, rid) == receipt
        assert stored_records(env) == records
    # Every line exactly as it left the first store.
    for kind in ("secret", "receipt"):
        assert sorted(json.dumps(v) for v in lines(to_mongo.stdout) if v.get("type") == kind) == (
            sorted(json.dumps(v) for v in lines(data) if v.get("type") == kind)
        )

    # And the service at the end of the trip answers the status the first one did.
    first, last = make_client(), make_client(**back, **key)
    for rid in made.receipt_ids():
        asked = [c.post("/vault/secret/status", json={"receipt_id": rid}) for c in (first, last)]
        assert asked[0].status_code == asked[1].status_code == 200
        assert asked[0].json() == asked[1].json()
    # The read secret carries on where it was: one read taken, its receipt counting on.
    read = made.answers["read"]
    assert (
        last.post("/vault/secret/fetch", json={"secret_id": read["secret_id"]}).json()["reads_left"]
        == 1
    )
    after = last.post("/vault/secret/status", json={"receipt_id": read["receipt_id"]}).json()
    assert (after["reads"], after["reads_left"], after["label"]) == (2, 1, "deploy token for ci")


def test_the_receipt_of_an_ended_secret_travels_alone(
    make_client: Callable[..., TestClient],
    store_kind: str,
    store_env: dict[str, str],
    tmp_path: Path,
    mongo_uri: str,
) -> None:
    client = make_client()
    answer = client.post(
        "/vault/secret/create",
        json={"secret": b64(b"x"), "receipt": True, "max_reads": 1, "label": "one read"},
    ).json()
    assert client.post("/vault/secret/fetch", json={"secret_id": answer["secret_id"]}).is_success
    before = stored_receipt(store_env, answer["receipt_id"])
    assert before is not None and before.state == ReceiptState.USED_UP

    data = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    assert [line["type"] for line in lines(data)[1:]] == ["receipt", "end"]
    target = other_store("mongo" if store_kind == "sqlite" else "sqlite", tmp_path, mongo_uri, "t")
    imported = cli(target, "import", cwd=tmp_path, stdin=data)
    assert imported.returncode == 0, imported.stderr
    counts = summary_counts(imported.stderr.decode())
    assert (counts["new"], receipt_counts(imported.stderr.decode())) == (0, (1, 0))

    key = {"MASTER_KEY": store_env["MASTER_KEY"]}
    assert stored_receipt({**target, **key}, answer["receipt_id"]) == before
    with TestClient(create_app(Settings.from_env({**target, **key}))) as elsewhere:
        status = elsewhere.post("/vault/secret/status", json={"receipt_id": answer["receipt_id"]})
    assert status.status_code == 200
    assert (
        status.json()
        == client.post("/vault/secret/status", json={"receipt_id": answer["receipt_id"]}).json()
    )
    assert status.json()["state"] == "used_up" and status.json()["label"] == "one read"


# --- a receipt stored already: brought forward, never back -------------------------------

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def bulk_env(store_kind: str, tmp_path: Path, mongo_uri: str) -> dict[str, str]:
    return other_store(store_kind, tmp_path, mongo_uri, "bulk")


def held(bulk: BulkStore) -> dict[str, Receipt]:
    return {receipt.receipt_key: receipt for receipt in bulk.receipts()}


def test_a_stored_receipt_is_brought_forward_and_never_back(
    store_kind: str, tmp_path: Path, mongo_uri: str
) -> None:
    receipt_id = str(uuid.uuid4())
    fresh = Receipt(
        receipt_key=receipt_key(receipt_id),
        tenant="acme",
        label="l",
        created_at=at(0.123456),
        expires_at=at(3600),
        max_reads=5,
    )
    two_reads = dataclasses.replace(fresh, reads=2, first_read_at=at(10), last_read_at=at(20.5))
    # Another copy of the receipt, read once earlier and once later than the store knows.
    elsewhere = dataclasses.replace(fresh, reads=1, first_read_at=at(5), last_read_at=at(30))
    env = bulk_env(store_kind, tmp_path, mongo_uri)
    with Bulk(env, create=True) as bulk:
        assert bulk.add_receipts([fresh]) == 1
        assert bulk.add_receipts([fresh]) == 0
        assert held(bulk) == {fresh.receipt_key: fresh}
        assert bulk.add_receipts([two_reads]) == 0
        assert held(bulk)[fresh.receipt_key] == two_reads
        assert bulk.add_receipts([fresh, elsewhere]) == 0  # neither takes anything back
        forward = dataclasses.replace(two_reads, first_read_at=at(5), last_read_at=at(30))
        assert held(bulk)[fresh.receipt_key] == forward

        deleted = dataclasses.replace(forward, state=ReceiptState.DELETED, ended_at=at(40))
        used_up = dataclasses.replace(forward, state=ReceiptState.USED_UP, ended_at=at(35))
        assert bulk.add_receipts([deleted, used_up, fresh]) == 0
        assert held(bulk)[fresh.receipt_key] == deleted  # a secret ends once
        assert bulk.add_receipts([dataclasses.replace(deleted, tenant="beta", reads=5)]) == 0
        assert held(bulk)[fresh.receipt_key] == deleted  # another tenant's: left alone

        # Twice in one batch, never stored: one new, the later copy brought forward onto it.
        other = dataclasses.replace(fresh, receipt_key=receipt_key(str(uuid.uuid4())))
        assert bulk.add_receipts([other, dataclasses.replace(other, **_read(3, 2))]) == 1
        assert held(bulk)[other.receipt_key] == dataclasses.replace(other, **_read(3, 2))
        assert list(held(bulk)) == sorted(held(bulk))  # streamed in key order
        assert bulk.count_receipts() == 2
    assert stored_receipt(env, receipt_id) == deleted  # what status reads


def _read(seconds: float, reads: int) -> dict[str, Any]:
    return {"reads": reads, "first_read_at": at(seconds), "last_read_at": at(seconds)}


def test_a_second_pass_carries_the_reads_and_ends_of_receipts(
    made: Made,
    make_client: Callable[..., TestClient],
    store_env: dict[str, str],
    tmp_path: Path,
) -> None:
    # Into SQLite, whose times are exact: nx-27017 keeps a number an update writes to 15
    # significant digits (MongoDB's own merges are compared in the test above).
    target = {"DATA_DIR": str(tmp_path / "target")}

    def export() -> bytes:
        return cli(without_keys(store_env), "export", cwd=tmp_path).stdout

    first = cli(target, "import", cwd=tmp_path, stdin=export())
    assert first.returncode == 0, first.stderr
    client = make_client()
    read = made.answers["read"]
    assert client.post("/vault/secret/fetch", json={"secret_id": read["secret_id"]}).is_success
    expiring = made.answers["expiring"]
    assert client.post("/vault/secret/delete", json={"secret_id": expiring["secret_id"]}).is_success

    second = cli(target, "import", cwd=tmp_path, stdin=export())
    assert second.returncode == 0, second.stderr
    assert receipt_counts(second.stderr.decode()) == (0, 4)
    key = {"MASTER_KEY": store_env["MASTER_KEY"]}
    for answer in (read, expiring):
        source = stored_receipt(store_env, answer["receipt_id"])
        assert stored_receipt({**target, **key}, answer["receipt_id"]) == source
    assert getattr(stored_receipt(store_env, expiring["receipt_id"]), "state", None) == "deleted"


# --- malformed lines -----------------------------------------------------------------------

RECEIPT_ID = "4f6b2a7e-1c3d-4e5f-8a9b-0c1d2e3f4a5b"


def a_receipt_line() -> dict[str, Any]:
    """A receipt line as an export writes it: a secret read once, still active."""
    return {
        "type": "receipt",
        "receipt_key": receipt_key(RECEIPT_ID),
        "tenant": "default",
        "label": "deploy",
        "created_at": "2026-01-01T00:00:00.123456Z",
        "expires_at": None,
        "max_reads": 3,
        "reads": 1,
        "first_read_at": "2026-01-01T00:01:00.000001Z",
        "last_read_at": "2026-01-01T00:01:00.000001Z",
        "ended_at": None,
        "state": "active",
    }


BAD_RECEIPT: dict[str, tuple[dict[str, Any], str]] = {
    "key not hex": ({"receipt_key": "g" * 64}, "receipt_key is not 64 hex digits"),
    "key the id itself": ({"receipt_key": RECEIPT_ID}, "receipt_key is not 64 hex digits"),
    "key not text": ({"receipt_key": 7}, "receipt_key is not 64 hex digits"),
    "empty tenant": ({"tenant": ""}, "tenant is not a tenant name"),
    "tenant with a slash": ({"tenant": "acme/ci"}, "tenant is not a tenant name"),
    "label with a line break": ({"label": "two\nlines"}, "label is not 1-200 printable"),
    "label too long": ({"label": "x" * 201}, "label is not 1-200 printable"),
    "empty label": ({"label": ""}, "label is not 1-200 printable"),
    "label not text": ({"label": 5}, "label is not 1-200 printable"),
    "no created_at": ({"created_at": None}, "created_at is not an RFC 3339 UTC time"),
    "created_at not a time": ({"created_at": "yesterday"}, "created_at is not an RFC 3339"),
    "expires_at not a time": ({"expires_at": "soon"}, "expires_at is not an RFC 3339 UTC time"),
    "no reads left to have": ({"max_reads": 0}, "max_reads is not a whole number of reads"),
    "max_reads a boolean": ({"max_reads": True}, "max_reads is not a whole number of reads"),
    "negative reads": ({"reads": -1}, "reads is not a whole number of reads, from 0"),
    "more reads than allowed": ({"reads": 4}, "reads is not a whole number of reads, from 0"),
    "reads as text": ({"reads": "1"}, "reads is not a whole number of reads, from 0"),
    "a read without its time": ({"first_read_at": None}, "first_read_at and last_read_at"),
    "read times without reads": ({"reads": 0}, "first_read_at and last_read_at"),
    "first read after the last": (
        {"first_read_at": "2026-01-01T00:02:00.000000Z"},
        "first_read_at and last_read_at",
    ),
    "unknown state": ({"state": "forgotten"}, "state is not one of active, used_up"),
    "active yet ended": (
        {"ended_at": "2026-01-01T00:03:00.000000Z"},
        "ended_at is not null exactly while state is active",
    ),
    "ended without a time": ({"state": "deleted"}, "ended_at is not null exactly while"),
    "a field missing": ({"state": ...}, "is not a whole receipt record"),
    "the receipt id": ({"receipt_id": RECEIPT_ID}, "is not a whole receipt record"),
}
BAD_SECRET: dict[str, tuple[dict[str, Any], str]] = {
    "receipt id in capitals": (
        {"receipt_id": RECEIPT_ID.upper()},
        "receipt_id is not a lower-case UUID",
    ),
    "receipt id no UUID": ({"receipt_id": "not-a-uuid-at-all"}, "receipt_id is not a lower-case"),
    "receipt id not text": ({"receipt_id": 12}, "receipt_id is not a lower-case UUID"),
    "empty label": ({"label": ""}, "label is not 1-200 printable characters"),
    "label with a separator": ({"label": "a\u2028b"}, "label is not 1-200 printable"),
    "label too long": ({"label": "é" * 201}, "label is not 1-200 printable characters"),
}


def refused(data: bytes, tmp_path: Path) -> str:
    """The one line an import of ``data`` is refused with; nothing written."""
    target = {"DATA_DIR": str(tmp_path / "target")}
    result = cli(target, "import", cwd=tmp_path, stdin=data)
    assert result.returncode == 2, result.stderr
    message = result.stderr.decode()
    assert message.count("\n") == 1, message
    assert message.rstrip().endswith("nothing was written")
    assert store_is_untouched(target)
    return message


def assert_values_not_named(fields: dict[str, Any], message: str) -> None:
    for value in fields.values():
        if isinstance(value, str) and len(value) > 1:
            assert value not in message and value.upper() not in message


@pytest.mark.parametrize("bad", sorted(BAD_RECEIPT))
def test_a_malformed_receipt_line_is_refused_naming_its_line_and_field(
    bad: str, master_key: str, tmp_path: Path
) -> None:
    fields, reason = BAD_RECEIPT[bad]
    line = {
        name: value for name, value in {**a_receipt_line(), **fields}.items() if value is not ...
    }
    good = a_secret_line(master_key, str(uuid.uuid4()), b"fine")
    data = export_file(good, a_receipt_line() | {"receipt_key": "a" * 64}, line)
    message = refused(data, tmp_path)
    assert f"refused standard input: line 4: {reason}" in message or (
        f"line 4 {reason}" in message
    ), message
    assert_values_not_named(fields, message)


@pytest.mark.parametrize("bad", sorted(BAD_SECRET))
def test_a_malformed_receipt_id_or_label_of_a_secret_is_refused_naming_its_line(
    bad: str, master_key: str, tmp_path: Path
) -> None:
    fields, reason = BAD_SECRET[bad]
    good = a_secret_line(master_key, str(uuid.uuid4()), b"fine")
    line = {**a_secret_line(master_key, str(uuid.uuid4()), b"x"), **fields}
    message = refused(export_file(good, OLD_AUDIT_LINE, line), tmp_path)
    assert f"refused standard input: line 4: {reason}" in message, message
    assert_values_not_named(fields, message)


def test_receipt_lines_are_counted_in_the_end_line(master_key: str, tmp_path: Path) -> None:
    good = a_secret_line(master_key, str(uuid.uuid4()), b"fine")
    # export_file counts receipt lines as audit records: an end line without "receipts".
    message = refused(export_file(good, a_receipt_line()), tmp_path)
    assert "its end line counts 1 secrets, 0 receipts and 1 audit records, the file " in message
    assert "holds 1, 1 and 0" in message
    data = export_file(good, a_receipt_line())
    head, end = data[: data.rindex(b'{"type":"end"')], lines(data)[-1]
    for counted, why in ((2, "the file holds 1, 1 and 0"), ("1", "end line is damaged")):
        wrong = {"type": "end", "secrets": 1, "receipts": counted, "audit": 0}
        line = json.dumps({**wrong, "sha256": end["sha256"]}, separators=(",", ":"))
        assert why in refused(head + line.encode() + b"\n", tmp_path)
    right = {"type": "end", "secrets": 1, "receipts": 1, "audit": 0, "sha256": end["sha256"]}
    data = head + json.dumps(right, separators=(",", ":")).encode() + b"\n"
    result = cli({"DATA_DIR": str(tmp_path / "t")}, "import", cwd=tmp_path, stdin=data)
    assert result.returncode == 0, result.stderr
    assert receipt_counts(result.stderr.decode()) == (1, 0)


def test_well_formed_receipt_fields_are_read_as_written(master_key: str) -> None:
    line = {
        **a_secret_line(master_key, str(uuid.uuid4()), b"x"),
        "receipt_id": RECEIPT_ID,
        "label": "é" * 200,
    }
    record = transfer.parse_secret(line, 2)
    assert (record.sealed.receipt_id, record.sealed.label) == (RECEIPT_ID, "é" * 200)
    assert transfer.secret_line(record) == line
    # Explicit nulls read as a secret made without them; written without them.
    plain = transfer.parse_secret({**line, "receipt_id": None, "label": None}, 2)
    assert set(transfer.secret_line(plain)) == EXPORT_FIELDS
    receipt = transfer.parse_receipt(a_receipt_line(), 3)
    assert transfer.receipt_line(receipt) == a_receipt_line()
    ended = {
        **a_receipt_line(),
        "label": None,
        "expires_at": "2026-01-02T00:00:00Z",
        "max_reads": None,
        "reads": 0,
        "first_read_at": None,
        "last_read_at": None,
        "ended_at": "2026-01-02T00:00:00.000000Z",
        "state": "expired",
    }
    assert transfer.receipt_line(transfer.parse_receipt(ended, 3)) == ended
    # A format 1 file was written before these fields: there, they are no field at all.
    v1 = {k: v for k, v in line.items() if k != "record_key"} | {"secret_id": str(uuid.uuid4())}
    with pytest.raises(TransferRefused, match=r"^line 2 is not a whole secret record"):
        transfer.parse_secret(v1, 2, version=1)


@pytest.mark.parametrize("store_kind", ["sqlite", "mongo"], indirect=True)
def test_a_file_without_receipts_imports_and_exports_as_before(
    make_client: Callable[..., TestClient],
    store_env: dict[str, str],
    master_key: str,
    tmp_path: Path,
) -> None:
    secret_id = str(uuid.uuid4())
    data = export_file(a_secret_line(master_key, secret_id, b"old"), OLD_AUDIT_LINE)
    result = cli(without_keys(store_env), "import", cwd=tmp_path, stdin=data)
    assert result.returncode == 0, result.stderr
    assert (
        summary_counts(result.stderr.decode())["new"],
        receipt_counts(result.stderr.decode()),
    ) == (1, (0, 0))
    record = stored_records(store_env)[record_key(secret_id)]
    assert (record.receipt_id, record.label) == (None, None)
    # Exported again: every record line as that file had it, and the end line without
    # "receipts", as earlier releases write and read it.
    again = cli(without_keys(store_env), "export", "--audit", cwd=tmp_path)
    assert "; 0 receipts; SHA-256 " in again.stderr.decode()
    assert again.stdout.split(b"\n")[1:-2] == data.split(b"\n")[1:-2]
    assert list(lines(again.stdout)[-1]) == ["type", "secrets", "audit", "sha256"]
    got = make_client().post("/vault/secret/fetch", json={"secret_id": secret_id})
    assert got.json()["secret"] == b64(b"old")


def edit_receipt(env: dict[str, str], receipt_id: str, **fields: Any) -> None:
    """Overwrite fields of a stored receipt, below the service (a database edit)."""
    key = receipt_key(receipt_id)
    if "MONGO_URI" in env:
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            client[env["MONGO_DB"]]["receipts"].update_one({"_id": key}, {"$set": fields})
        return
    with sqlite3.connect(Path(env["DATA_DIR"]) / "vault.db") as conn:
        for name, value in fields.items():
            conn.execute(
                f"UPDATE receipts SET {name} = ? WHERE receipt_key = ?",  # noqa: S608 - test names
                (value, key),
            )


def test_an_export_leaves_out_a_receipt_edited_malformed(
    made: Made, store_env: dict[str, str], tmp_path: Path
) -> None:
    broken = made.answers["deleted"]["receipt_id"]
    edit_receipt(store_env, broken, state="forgotten")
    result = cli(without_keys(store_env), "export", "-o", "b.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "; 3 receipts (1 not whole, left out); SHA-256 " in result.stderr.decode()
    data = (tmp_path / "b.jsonl").read_bytes()
    assert receipt_key(broken) not in {line.get("receipt_key") for line in lines(data)}
    # The file the others make is whole: an import takes it.
    imported = cli({"DATA_DIR": str(tmp_path / "t")}, "import", "-i", "b.jsonl", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert receipt_counts(imported.stderr.decode()) == (3, 0)


@pytest.mark.parametrize("change", [{"label": "another"}, {"receipt_id": RECEIPT_ID}])
def test_a_secret_held_with_another_receipt_or_label_is_a_conflict_left_untouched(
    change: dict[str, str], master_key: str, tmp_path: Path
) -> None:
    line = {
        **a_secret_line(master_key, str(uuid.uuid4()), b"x"),
        "receipt_id": str(uuid.uuid4()),
        "label": "mine",
    }
    target = {"DATA_DIR": str(tmp_path / "t")}
    first = cli(target, "import", cwd=tmp_path, stdin=export_file(line))
    assert first.returncode == 0, first.stderr
    again = cli(target, "import", cwd=tmp_path, stdin=export_file({**line, **change}))
    assert again.returncode == 1, again.stderr
    assert summary_counts(again.stderr.decode())["conflicts"] == 1
    assert "conflict at line 2 of standard input" in again.stderr.decode()
    held = stored_records(target)[line["record_key"]]
    assert (held.receipt_id, held.label) == (line["receipt_id"], "mine")
