"""Secrets under a passphrase through ``secret-manager export`` and ``import``, on both stores.

Secrets are made and guessed at through the service; the files are carried by the real
commands; the other store is then served by the service again, which must still ask for the
passphrase, open the secret with it, and remember the wrong tries already spent.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.conftest import b64
from tests.test_transfer import (
    EXPORT_FIELDS,
    OLD_AUDIT_LINE,
    a_secret_line,
    cli,
    edit_access,
    export_file,
    lines,
    other_store,
    secret_lines,
    summary_counts,
    without_keys,
)
from tests.test_transfer_receipts import (
    RECEIPT_LINE_FIELDS,
    Bulk,
    a_receipt_line,
    assert_values_not_named,
    refused,
    stored_records,
)
from vault import transfer
from vault.app import create_app
from vault.crypto import SCRYPT_KDF, known_kdf
from vault.records import SealedSecret, record_key
from vault.settings import Settings

PASSPHRASE = "correct horse battery staple"
LOCKED = 'this secret is protected by a passphrase: send it as "passphrase" in the fetch body'


@contextmanager
def serving(env: dict[str, str]) -> Iterator[TestClient]:
    """The service on the store ``env`` names (with its master key)."""
    with TestClient(create_app(Settings.from_env(env))) as client:
        yield client


def fetch(client: TestClient, secret_id: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    answer = client.post("/vault/secret/fetch", json={"secret_id": secret_id, **fields})
    body: dict[str, Any] = answer.json()
    return answer.status_code, body


def make_locked(client: TestClient, *, wrong: int, **fields: Any) -> dict[str, Any]:
    """A secret under PASSPHRASE with a receipt, and ``wrong`` wrong passphrases tried."""
    made = client.post(
        "/vault/secret/create",
        json={"secret": b64(b"the vault combination"), "passphrase": PASSPHRASE, **fields},
    )
    assert made.status_code == 200, made.text
    answer: dict[str, Any] = made.json()
    for _ in range(wrong):
        status, _body = fetch(client, answer["secret_id"], passphrase="tr0ub4dor&3")
        assert status == 403
    return answer


def status_of(client: TestClient, receipt_id: str) -> dict[str, Any]:
    answer = client.post("/vault/secret/status", json={"receipt_id": receipt_id})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_a_secret_under_a_passphrase_moves_to_the_other_store_and_back_still_locked(
    make_client: Callable[..., TestClient],
    store_kind: str,
    store_env: dict[str, str],
    tmp_path: Path,
    mongo_uri: str,
) -> None:
    client = make_client()
    locked = make_locked(client, wrong=2, receipt=True, label="safe")
    plain = client.post("/vault/secret/create", json={"secret": b64(b"open"), "receipt": True})
    assert status_of(client, locked["receipt_id"])["passphrase_failures"] == 2

    data = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    by_key = {line["record_key"]: line for line in secret_lines(data)}
    line = by_key[record_key(locked["secret_id"])]
    assert set(line) == EXPORT_FIELDS | {"receipt_id", "label", "kdf", "passphrase_failures"}
    assert (line["kdf"], line["passphrase_failures"]) == (SCRYPT_KDF, 2)
    assert set(by_key[record_key(plain.json()["secret_id"])]) == EXPORT_FIELDS | {"receipt_id"}
    receipts = {line["label"]: line for line in lines(data) if line.get("type") == "receipt"}
    assert set(receipts["safe"]) == RECEIPT_LINE_FIELDS | {"passphrase_failures"}
    assert receipts["safe"]["passphrase_failures"] == 2
    assert set(receipts[None]) == RECEIPT_LINE_FIELDS  # a receipt of a plain secret: as before

    other = "mongo" if store_kind == "sqlite" else "sqlite"
    there = other_store(other, tmp_path, mongo_uri, "there")
    imported = cli(there, "import", cwd=tmp_path, stdin=data)
    assert imported.returncode == 0, imported.stderr
    assert summary_counts(imported.stderr.decode())["new"] == 2
    assert stored_records(there) == stored_records(store_env)
    # Back again: every line as it left the first store.
    back = cli(without_keys(there), "export", cwd=tmp_path).stdout
    for kind in ("secret", "receipt"):
        assert sorted(json.dumps(v) for v in lines(back) if v.get("type") == kind) == sorted(
            json.dumps(v) for v in lines(data) if v.get("type") == kind
        )

    key = {"MASTER_KEY": store_env["MASTER_KEY"]}
    with serving({**there, **key}) as elsewhere:
        secret_id = locked["secret_id"]
        assert fetch(elsewhere, secret_id) == (403, {"detail": LOCKED})
        # Two tries spent before the move: the third wrong one leaves two.
        assert fetch(elsewhere, secret_id, passphrase="Tr0ub4dor&3") == (
            403,
            {"detail": "the passphrase is wrong; after 2 more wrong tries the secret is deleted"},
        )
        assert status_of(elsewhere, locked["receipt_id"])["passphrase_failures"] == 3
        status, body = fetch(elsewhere, secret_id, passphrase=PASSPHRASE)
        assert (status, body["secret"]) == (200, b64(b"the vault combination"))


@pytest.mark.parametrize("store_kind", ["sqlite", "mongo"], indirect=True)
def test_an_import_never_gives_back_a_wrong_try(
    make_client: Callable[..., TestClient],
    store_kind: str,
    store_env: dict[str, str],
    tmp_path: Path,
    mongo_uri: str,
) -> None:
    client = make_client()
    locked = make_locked(client, wrong=1, receipt=True)
    early = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    for _ in range(2):
        assert fetch(client, locked["secret_id"], passphrase="guess")[0] == 403
    late = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    target = other_store(store_kind, tmp_path, mongo_uri, "t")

    def import_(data: bytes) -> transfer.Counts:
        (tmp_path / "f.jsonl").write_bytes(data)
        with (tmp_path / "f.jsonl").open("rb") as source:
            return transfer.import_(
                lambda: Bulk(target, create=True).store,
                source,
                bar=transfer.no_bar,
                conflict=lambda line: None,
            )

    assert import_(early).new == 1
    # Through the command: its summary accounts for the secret whose tries were raised.
    later = cli(
        {**target, "MASTER_KEY": store_env["MASTER_KEY"]}, "import", cwd=tmp_path, stdin=late
    )
    assert later.returncode == 0, later.stderr
    assert (
        "secrets 0 new, 0 already there, 0 with fewer reads left, "
        "1 with more wrong passphrase tries, 0 expired since the export, 0 conflicts;"
    ) in later.stderr.decode()
    again = import_(early)
    assert (again.present, again.more_failures, again.conflicts) == (1, 0, 0)
    (held,) = stored_records(target).values()
    assert held.passphrase_failures == 3
    key = {"MASTER_KEY": store_env["MASTER_KEY"]}
    with serving({**target, **key}) as elsewhere:
        assert status_of(elsewhere, locked["receipt_id"])["passphrase_failures"] == 3
        # Two tries were left, whichever file came last.
        assert fetch(elsewhere, locked["secret_id"], passphrase="guess") == (
            403,
            {"detail": "the passphrase is wrong; after 1 more wrong try the secret is deleted"},
        )


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
def test_a_secret_held_under_another_passphrase_marker_is_a_conflict(
    make_client: Callable[..., TestClient], store_env: dict[str, str], tmp_path: Path
) -> None:
    make_locked(make_client(), wrong=0)
    data = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    (line,) = secret_lines(data)
    other = export_file({**line, "kdf": "scrypt:16384:8:1"})
    target = {"DATA_DIR": str(tmp_path / "t")}
    assert cli(target, "import", cwd=tmp_path, stdin=other).returncode == 0
    result = cli(target, "import", cwd=tmp_path, stdin=data)
    assert result.returncode == 1
    assert summary_counts(result.stderr.decode())["conflicts"] == 1
    (held,) = stored_records(target).values()
    assert held.kdf == "scrypt:16384:8:1"  # left untouched


@pytest.mark.parametrize("store_kind", ["sqlite", "mongo"], indirect=True)
def test_an_export_leaves_out_a_secret_whose_passphrase_marker_was_edited_malformed(
    make_client: Callable[..., TestClient], store_env: dict[str, str], tmp_path: Path
) -> None:
    client = make_client()
    kept, edited = (make_locked(client, wrong=0) for _ in range(2))
    edit_access(store_env, edited["secret_id"], kdf="scrypt:bogus")

    result = cli(without_keys(store_env), "export", "-o", "b.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "exported 1 secret and" in result.stderr.decode()
    assert "(1 expired or used up, left out)" in result.stderr.decode()
    data = (tmp_path / "b.jsonl").read_bytes()
    assert [line["record_key"] for line in secret_lines(data)] == [record_key(kept["secret_id"])]
    imported = cli({"DATA_DIR": str(tmp_path / "t")}, "import", "-i", "b.jsonl", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr


def test_plain_secret_and_receipt_lines_are_written_byte_for_byte_as_before(
    master_key: str, tmp_path: Path
) -> None:
    secret = a_secret_line(master_key, str(uuid.uuid4()), b"plain")
    receipt = a_receipt_line()
    data = export_file(secret, receipt)
    # export_file counts the receipt line as an audit record: the end line of a real export.
    end = {"type": "end", "secrets": 1, "receipts": 1, "audit": 0}
    head = data[: data.rindex(b'{"type":"end"')]
    end["sha256"] = hashlib.sha256(head).hexdigest()
    data = head + json.dumps(end, separators=(",", ":")).encode() + b"\n"
    target = {"DATA_DIR": str(tmp_path / "t")}
    assert cli(target, "import", cwd=tmp_path, stdin=data).returncode == 0
    again = cli(target, "export", cwd=tmp_path).stdout.splitlines(keepends=True)
    assert again[1:3] == data.splitlines(keepends=True)[1:3]


GOOD = {"kdf": SCRYPT_KDF, "passphrase_failures": 1}
BAD_PASSPHRASE: dict[str, tuple[dict[str, Any], str]] = {
    "marker without tries": ({"kdf": SCRYPT_KDF}, "kdf and passphrase_failures are not both"),
    "tries without marker": (
        {"passphrase_failures": 0},
        "kdf and passphrase_failures are not both",
    ),
    "null marker": ({**GOOD, "kdf": None}, "kdf is not a passphrase key derivation"),
    "marker not text": ({**GOOD, "kdf": 32768}, "kdf is not a passphrase key derivation"),
    "unknown derivation": (
        {**GOOD, "kdf": "argon2id:3:65536:4"},
        "kdf is not a passphrase key derivation",
    ),
    "marker cut short": ({**GOOD, "kdf": "scrypt:32768:8"}, "kdf is not a passphrase key"),
    "cost past the limit": ({**GOOD, "kdf": "scrypt:2097152:8:3"}, "kdf is not a passphrase"),
    "N no power of two": ({**GOOD, "kdf": "scrypt:30000:8:3"}, "kdf is not a passphrase key"),
    "no parallelism": ({**GOOD, "kdf": "scrypt:32768:8:0"}, "kdf is not a passphrase key"),
    "superscript digits": ({**GOOD, "kdf": "scrypt:32768:\u00b2:3"}, "kdf is not a passphrase"),
    "a number too long": ({**GOOD, "kdf": "scrypt:" + "9" * 5000 + ":8:3"}, "kdf is not a"),
    "negative tries": (
        {**GOOD, "passphrase_failures": -1},
        "passphrase_failures is not a whole number of wrong tries",
    ),
    "tries a boolean": (
        {**GOOD, "passphrase_failures": True},
        "passphrase_failures is not a whole number of wrong tries",
    ),
    "tries as text": (
        {**GOOD, "passphrase_failures": "1"},
        "passphrase_failures is not a whole number of wrong tries",
    ),
    "tries a fraction": (
        {**GOOD, "passphrase_failures": 1.5},
        "passphrase_failures is not a whole number of wrong tries",
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_PASSPHRASE))
def test_a_malformed_passphrase_marker_or_tries_is_refused_naming_its_line(
    bad: str, master_key: str, tmp_path: Path
) -> None:
    fields, reason = BAD_PASSPHRASE[bad]
    good = {**a_secret_line(master_key, str(uuid.uuid4()), b"fine"), **GOOD}
    line = {**a_secret_line(master_key, str(uuid.uuid4()), b"x"), **fields}
    message = refused(export_file(good, OLD_AUDIT_LINE, line), tmp_path)
    assert f"refused standard input: line 4: {reason}" in message, message
    assert_values_not_named(fields, message)


@pytest.mark.parametrize("tries", [-1, True, "2", 0.5])
def test_a_receipt_line_with_malformed_tries_is_refused_naming_its_line(
    tries: Any, master_key: str, tmp_path: Path
) -> None:
    good = a_secret_line(master_key, str(uuid.uuid4()), b"fine")
    receipt = {**a_receipt_line(), "passphrase_failures": tries}
    message = refused(export_file(good, OLD_AUDIT_LINE, receipt), tmp_path)
    assert (
        "refused standard input: line 4: passphrase_failures is not a whole number of wrong "
        "tries, at least 0, or null"
    ) in message, message


def test_well_formed_passphrase_fields_are_read_as_written(master_key: str) -> None:
    value = {**a_secret_line(master_key, str(uuid.uuid4()), b"x"), **GOOD}
    sealed: SealedSecret = transfer.parse_secret(value, 2).sealed
    assert (sealed.kdf, sealed.passphrase_failures) == (SCRYPT_KDF, 1)
    assert transfer.secret_line(transfer.parse_secret(value, 2)) == value
    receipt = transfer.parse_receipt({**a_receipt_line(), "passphrase_failures": 4}, 3)
    assert receipt.passphrase_failures == 4
    assert transfer.receipt_line(receipt) == {**a_receipt_line(), "passphrase_failures": 4}
    assert transfer.parse_receipt(a_receipt_line(), 3).passphrase_failures is None
    # null, as every receipt field where it does not apply: a receipt of a plain secret
    nulled = transfer.parse_receipt({**a_receipt_line(), "passphrase_failures": None}, 3)
    assert transfer.receipt_line(nulled) == a_receipt_line()
    assert known_kdf(SCRYPT_KDF) and known_kdf("scrypt:1048576:32:16")
