"""``secret-manager export`` and ``import``, run as a user runs them, on both stores.

Records are created through the service, carried by real subprocesses over real files and
pipes, and served again afterwards under the same key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pymongo
import pytest
from starlette.testclient import TestClient

from tests.conftest import audit_record, b64, clean_env, keys_of, on_store, wait_until
from vault import transfer
from vault.crypto import Keyring, parse_key
from vault.errors import CorruptRecord, TransferRefused
from vault.lifecycle import Caller, Fetched, Found
from vault.records import record_key
from vault.stores.base import SecretStore

EXPORT_FIELDS = {
    "type",
    "record_key",
    "key_id",
    "nonce",
    "ciphertext",
    "created_at",
    "expires_at",
    "reads_left",
}


def cli(
    env: dict[str, str], *args: str, cwd: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``secret-manager ARGS`` with only ``env`` configured (no master key unless given)."""
    return subprocess.run(
        [sys.executable, "-m", "vault", *args],
        env=clean_env(**env),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


def pipe(source: dict[str, str], target: dict[str, str], *, cwd: Path) -> tuple[str, str]:
    """``export --audit | import`` between two stores; both summaries. Both must succeed."""
    exporter = subprocess.Popen(
        [sys.executable, "-m", "vault", "export", "--audit"],
        env=clean_env(**source),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    importer = subprocess.run(
        [sys.executable, "-m", "vault", "import"],
        env=clean_env(**target),
        cwd=cwd,
        stdin=exporter.stdout,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert exporter.stdout is not None and exporter.stderr is not None
    exporter.stdout.close()
    exported = exporter.stderr.read().decode()
    exporter.stderr.close()
    assert exporter.wait(30) == 0, exported
    assert importer.returncode == 0, importer.stderr.decode()
    return exported, importer.stderr.decode()


def without_keys(env: dict[str, str]) -> dict[str, str]:
    """Where the store is, and nothing else: export and import need no master key."""
    return {k: v for k, v in env.items() if k in ("DATA_DIR", "MONGO_URI", "MONGO_DB")}


def other_store(kind: str, tmp_path: Path, mongo_uri: str, name: str) -> dict[str, str]:
    """A fresh, empty store of ``kind``."""
    if kind == "sqlite":
        return {"DATA_DIR": str(tmp_path / name)}
    return {"MONGO_URI": mongo_uri, "MONGO_DB": "t" + uuid.uuid4().hex[:16]}


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def secret_lines(data: bytes) -> list[dict[str, Any]]:
    return [line for line in lines(data) if line.get("type") == "secret"]


def stored_keys(env: dict[str, str]) -> set[str]:
    """The record key of every secret record in the store ``env`` names (read below the
    service)."""
    if "MONGO_URI" in env:
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            return {str(doc["_id"]) for doc in client[env["MONGO_DB"]]["secrets"].find({})}
    import sqlite3

    database = Path(env["DATA_DIR"]) / "vault.db"
    with sqlite3.connect(database) as conn:
        return {row[0] for row in conn.execute("SELECT record_key FROM secrets")}


def store_is_untouched(env: dict[str, str]) -> bool:
    """Nothing was written: no data directory at all, or no MongoDB collection."""
    if "MONGO_URI" in env:
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            return client[env["MONGO_DB"]].list_collection_names() == []
    return not Path(env["DATA_DIR"]).exists()


@dataclasses.dataclass
class Population:
    """Secrets created through the service: id -> (plaintext, the create's answer)."""

    secrets: dict[str, tuple[bytes, dict[str, Any]]]
    expired_id: str
    used_up: int


def populate(client: TestClient, env: dict[str, str], count: int = 12) -> Population:
    """Plain, expiring and read-limited secrets, one with a read taken, one used up, and one
    expired (written below the service, so no wait is needed)."""
    secrets: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for n in range(count):
        plaintext = os.urandom(8 + n)
        fields: dict[str, Any] = {}
        if n % 3 == 1:
            fields["ttl_seconds"] = 3600
        if n % 3 == 2:
            fields["max_reads"] = 5
        answer = client.post(
            "/vault/secret/create", json={"secret": b64(plaintext), **fields}
        ).json()
        secrets[answer["secret_id"]] = (plaintext, answer)
    limited = next(i for i, (_, a) in secrets.items() if "reads_left" in a)
    read = client.post("/vault/secret/fetch", json={"secret_id": limited}).json()
    secrets[limited] = (secrets[limited][0], {**secrets[limited][1], "reads_left": 4})
    assert read["reads_left"] == 4
    one_time = client.post("/vault/secret/create", json={"secret": b64(b"x"), "max_reads": 1})
    client.post("/vault/secret/fetch", json={"secret_id": one_time.json()["secret_id"]})

    keyring = Keyring(parse_key(env["MASTER_KEY"]))
    expired_id = str(uuid.uuid4())
    sealed = dataclasses.replace(
        keyring.seal(record_key(expired_id), b"gone"),
        expires_at=dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=5),
    )

    async def insert(store: SecretStore) -> None:
        await store.insert(sealed)

    on_store(env, insert)
    return Population(secrets, expired_id, used_up=1)


@pytest.fixture
def population(
    make_client: Callable[..., TestClient], store_env: dict[str, str]
) -> Iterator[Population]:
    client = make_client()
    yield populate(client, store_env)


def test_export_writes_every_live_record_sealed_with_a_closing_sha256(
    population: Population, store_env: dict[str, str], tmp_path: Path
) -> None:
    held = len(stored_keys(store_env))  # with the expired one, unless already purged
    result = cli(without_keys(store_env), "export", "--audit", "--output", "b.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.partial"))

    header, *body, end = lines(data)
    assert header["format"] == "secret-manager-export" and header["version"] == 2
    secrets = [line for line in body if line["type"] == "secret"]
    audit = [line for line in body if line["type"] == "audit"]
    # Expired and used-up records are left out; every other one is there, whole.
    assert {line["record_key"] for line in secrets} == keys_of(*population.secrets)
    assert all(set(line) == EXPORT_FIELDS for line in secrets)
    # Named by their record keys: no secret id is in the file, which fetches nothing.
    for secret_id in [*population.secrets, population.expired_id]:
        assert secret_id.encode() not in data
        assert uuid.UUID(secret_id).bytes not in data
    ids = {record_key(secret_id): secret_id for secret_id in population.secrets}
    for line in secrets:
        answer = population.secrets[ids[line["record_key"]]][1]
        assert line["expires_at"] == answer.get("expires_at")
        assert line["reads_left"] == answer.get("reads_left")
        assert line["created_at"].endswith("Z")
    assert len(audit) >= len(population.secrets) + 3  # creates, the fetches, ...
    assert end == {
        "type": "end",
        "secrets": len(secrets),
        "audit": len(audit),
        "sha256": hashlib.sha256(data[: data.rindex(b'{"type":"end"')]).hexdigest(),
    }
    # Sealed, never plaintext.
    for plaintext, _ in population.secrets.values():
        assert plaintext not in data and b64(plaintext).encode() not in data
    summary = result.stderr.decode().strip()
    assert summary.count("\n") == 0
    assert f"exported {len(secrets)} secrets and {len(audit)} audit records" in summary
    assert f"({held - len(secrets)} expired or used up, left out)" in summary
    assert end["sha256"] in summary


def test_without_audit_the_file_holds_only_secrets(
    population: Population, store_env: dict[str, str], tmp_path: Path
) -> None:
    result = cli(without_keys(store_env), "export", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    kinds = {line.get("type") for line in lines(result.stdout)[1:]}
    assert kinds == {"secret", "end"}


def test_import_into_the_other_store_serves_every_secret_and_twice_adds_nothing(
    population: Population,
    store_kind: str,
    store_env: dict[str, str],
    tmp_path: Path,
    mongo_uri: str,
    make_client: Callable[..., TestClient],
) -> None:
    exported = cli(
        without_keys(store_env), "export", "--audit", "--output", "b.jsonl", cwd=tmp_path
    )
    assert exported.returncode == 0
    target = other_store("mongo" if store_kind == "sqlite" else "sqlite", tmp_path, mongo_uri, "t")

    first = cli(target, "import", "--input", "b.jsonl", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    count = len(population.secrets)
    assert f"secrets {count} new, 0 already there" in first.stderr.decode()
    second = cli(target, "import", "--input", "b.jsonl", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    summary = second.stderr.decode()
    assert f"secrets 0 new, {count} already there" in summary
    assert "audit records 0 new" in summary
    assert stored_keys(target) == keys_of(*population.secrets)

    # The same file again, exported from the target: the records are exactly as they were.
    again = cli(target, "export", "--audit", cwd=tmp_path)
    source_lines = secret_lines((tmp_path / "b.jsonl").read_bytes())
    assert sorted(map(json.dumps, secret_lines(again.stdout))) == sorted(
        map(json.dumps, source_lines)
    )

    served = make_client(**target, MASTER_KEY=store_env["MASTER_KEY"])
    for secret_id, (plaintext, answer) in population.secrets.items():
        got = served.post("/vault/secret/fetch", json={"secret_id": secret_id})
        assert got.status_code == 200
        assert got.json()["secret"] == b64(plaintext)
        if "reads_left" in answer:
            assert got.json()["reads_left"] == answer["reads_left"] - 1


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda data: b"",
    "cut mid-line": lambda data: data[: len(data) // 2],
    "cut at a line end": lambda data: data[: data.rindex(b'{"type":"end"')],
    "one byte altered": lambda data: data.replace(b'"status":200', b'"status":500', 1),
    "a line dropped": lambda data: b"\n".join(
        line for n, line in enumerate(data.split(b"\n")) if n != 2
    ),
    "foreign JSON": lambda data: b'{"secrets": []}\n',
    "not JSON": lambda data: b"\x89PNG\r\n\x1a\n" + data,
    "newer version": lambda data: data.replace(b'"version":2', b'"version":3', 1),
    "data after the end": lambda data: data + data.split(b"\n")[1] + b"\n",
}
REASON = {
    "empty": "it is empty",
    "cut mid-line": "it is truncated",
    "cut at a line end": "it is truncated",
    "one byte altered": "its SHA-256 does not match",
    "a line dropped": "it is damaged: its end line counts",
    "foreign JSON": "it is not a secret-manager export",
    "not JSON": "it is not a secret-manager export",
    "newer version": "written by a newer secret-manager (export format version 3",
    "data after the end": "more follows its end line",
}


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_file_is_refused_in_one_line_and_nothing_is_written(
    population: Population, store_env: dict[str, str], tmp_path: Path, damage: str
) -> None:
    data = cli(without_keys(store_env), "export", "--audit", cwd=tmp_path).stdout
    target = {"DATA_DIR": str(tmp_path / "target")}
    result = cli(target, "import", cwd=tmp_path, stdin=DAMAGE[damage](data))
    assert result.returncode == 2
    message = result.stderr.decode()
    assert message.count("\n") == 1, message
    assert message.startswith("secret-manager: import: refused standard input: ")
    assert REASON[damage] in message
    assert message.rstrip().endswith("nothing was written")
    assert store_is_untouched(target)


@pytest.mark.parametrize("store_kind", ["mongo"], indirect=True)
def test_a_truncated_file_writes_nothing_to_mongodb(
    population: Population, store_env: dict[str, str], tmp_path: Path, mongo_uri: str
) -> None:
    data = cli(without_keys(store_env), "export", "--audit", cwd=tmp_path).stdout
    target = other_store("mongo", tmp_path, mongo_uri, "t")
    cut = data[: data.rindex(b'{"type":"end"')]  # every record whole, the end line missing
    result = cli(target, "import", cwd=tmp_path, stdin=cut)
    assert result.returncode == 2
    assert "it is truncated" in result.stderr.decode()
    assert store_is_untouched(target)


def test_a_different_record_under_the_same_key_is_a_conflict_left_untouched(
    population: Population,
    store_kind: str,
    store_env: dict[str, str],
    tmp_path: Path,
    mongo_uri: str,
) -> None:
    data = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    target = other_store(store_kind, tmp_path, mongo_uri, "t")
    victim = secret_lines(data)[0]
    # The target already holds another record under the first record's key.
    other = {**victim, "nonce": b64(b"\x01" * 12), "ciphertext": b64(b"\x02" * 20)}
    forged = b"\n".join(
        [
            json.dumps({"format": "secret-manager-export", "version": 2}).encode(),
            json.dumps(other, separators=(",", ":")).encode(),
        ]
    )
    forged += b"\n"
    forged += json.dumps(
        {"type": "end", "secrets": 1, "audit": 0, "sha256": hashlib.sha256(forged).hexdigest()}
    ).encode()
    forged += b"\n"
    assert cli(target, "import", cwd=tmp_path, stdin=forged).returncode == 0

    result = cli(target, "import", cwd=tmp_path, stdin=data)
    assert result.returncode == 1
    message = result.stderr.decode()
    assert "conflict at line 2 of standard input" in message
    assert victim["record_key"] not in message
    count = len(population.secrets)
    assert f"secrets {count - 1} new, 0 already there, 0 with fewer reads left" in message
    assert "1 conflicts" in message
    # The record that was there is still there, unchanged.
    kept = [line for line in secret_lines(cli(target, "export", cwd=tmp_path).stdout)]
    assert [line for line in kept if line["record_key"] == victim["record_key"]] == [other]


def test_import_takes_reads_since_the_export_and_never_gives_one_back(
    make_client: Callable[..., TestClient],
    store_kind: str,
    store_env: dict[str, str],
    tmp_path: Path,
    mongo_uri: str,
) -> None:
    client = make_client()
    secret_id = client.post(
        "/vault/secret/create", json={"secret": b64(b"limited"), "max_reads": 5}
    ).json()["secret_id"]
    early = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    for _ in range(2):
        client.post("/vault/secret/fetch", json={"secret_id": secret_id})
    late = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    target = other_store(store_kind, tmp_path, mongo_uri, "t")

    assert cli(target, "import", cwd=tmp_path, stdin=early).returncode == 0
    taken = cli(target, "import", cwd=tmp_path, stdin=late)
    assert "0 new, 0 already there, 1 with fewer reads left" in taken.stderr.decode()
    assert cli(target, "import", cwd=tmp_path, stdin=early).returncode == 0
    (line,) = secret_lines(cli(target, "export", cwd=tmp_path).stdout)
    assert line["reads_left"] == 3


def format_1_export(master_key: str, secrets: dict[str, bytes]) -> bytes:
    """An export as the previous release wrote it (format 1): each record named by its
    secret id, and sealed with that id in its associated data."""
    keyring = Keyring(parse_key(master_key))

    def line(value: dict[str, Any]) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode() + b"\n"

    data = line(
        {
            "format": "secret-manager-export",
            "version": 1,
            "exported_at": "2026-01-01T00:00:00.000000Z",
            "store": "sqlite",
            "audit": False,
        }
    )
    for secret_id, plaintext in secrets.items():
        sealed = keyring.seal(secret_id, plaintext)
        data += line(
            {
                "type": "secret",
                "secret_id": secret_id,
                "key_id": sealed.key_id,
                "nonce": b64(sealed.nonce),
                "ciphertext": b64(sealed.ciphertext),
                "created_at": "2026-01-01T00:00:00.000000Z",
                "expires_at": None,
                "reads_left": None,
            }
        )
    end = {"type": "end", "secrets": len(secrets), "audit": 0}
    return data + line({**end, "sha256": hashlib.sha256(data).hexdigest()})


def test_a_format_1_file_is_imported_keyed_by_id_and_served_but_not_exported(
    make_client: Callable[..., TestClient],
    store_env: dict[str, str],
    master_key: str,
    tmp_path: Path,
) -> None:
    secrets = {str(uuid.uuid4()): os.urandom(16) for _ in range(3)}
    data = format_1_export(master_key, secrets)

    first = cli(without_keys(store_env), "import", cwd=tmp_path, stdin=data)
    assert first.returncode == 0, first.stderr
    summary = first.stderr.decode()
    assert summary.count("\n") == 1
    assert summary_counts(summary)["new"] == 3
    assert (
        "3 new secrets from this format 1 file stored under their secret id: run "
        "secret-manager rewrap to convert them"
    ) in summary
    assert stored_keys(store_env) == set(secrets)  # legacy records, as the file had them
    client = make_client()
    for secret_id, plaintext in secrets.items():
        got = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
        assert got.status_code == 200 and got.json()["secret"] == b64(plaintext)
    again = cli(without_keys(store_env), "import", cwd=tmp_path, stdin=data)
    assert summary_counts(again.stderr.decode())["present"] == 3
    assert "rewrap" not in again.stderr.decode()

    # An export would write their ids in clear: refused until rewrap converts them.
    refused = cli(without_keys(store_env), "export", "--output", "b.jsonl", cwd=tmp_path)
    assert refused.returncode == 2
    message = refused.stderr.decode()
    assert message.count("\n") == 1
    assert "the store still holds 3 records stored under their secret ids" in message
    assert "run secret-manager rewrap first" in message
    assert not list(tmp_path.glob("b.jsonl*"))
    to_pipe = cli(without_keys(store_env), "export", cwd=tmp_path)
    assert to_pipe.returncode == 2 and to_pipe.stdout == b""


def test_after_rewrap_a_format_1_import_exports_without_ids_and_is_already_there(
    make_client: Callable[..., TestClient],
    store_kind: str,
    store_env: dict[str, str],
    master_key: str,
    tmp_path: Path,
    mongo_uri: str,
) -> None:
    secrets = {str(uuid.uuid4()): os.urandom(16) for _ in range(3)}
    old_file = format_1_export(master_key, secrets)
    assert cli(without_keys(store_env), "import", cwd=tmp_path, stdin=old_file).returncode == 0

    rewrap = cli(store_env, "rewrap", cwd=tmp_path)  # needs the key: it re-seals them
    assert rewrap.returncode == 0, rewrap.stderr
    assert re.search(rb"converted +3$", rewrap.stdout, re.MULTILINE)
    exported = cli(without_keys(store_env), "export", "--output", "b.jsonl", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    data = (tmp_path / "b.jsonl").read_bytes()
    assert {line["record_key"] for line in secret_lines(data)} == keys_of(*secrets)
    for secret_id in secrets:
        assert secret_id.encode() not in data and uuid.UUID(secret_id).bytes not in data
    # The old file again: its secrets are the converted ones, already there.
    again = cli(without_keys(store_env), "import", cwd=tmp_path, stdin=old_file)
    assert again.returncode == 0, again.stderr
    assert summary_counts(again.stderr.decode())["present"] == 3
    assert stored_keys(store_env) == keys_of(*secrets)

    target = other_store("mongo" if store_kind == "sqlite" else "sqlite", tmp_path, mongo_uri, "t")
    moved = cli(target, "import", "--input", "b.jsonl", cwd=tmp_path)
    assert summary_counts(moved.stderr.decode())["new"] == 3
    served = make_client(**target, MASTER_KEY=master_key)
    for secret_id, plaintext in secrets.items():
        got = served.post("/vault/secret/fetch", json={"secret_id": secret_id})
        assert got.status_code == 200 and got.json()["secret"] == b64(plaintext)


def test_a_secret_that_expired_since_the_export_is_not_imported(
    make_client: Callable[..., TestClient], store_env: dict[str, str], tmp_path: Path
) -> None:
    client = make_client()
    client.post("/vault/secret/create", json={"secret": b64(b"brief"), "ttl_seconds": 1})
    data = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    (line,) = secret_lines(data)
    deadline = dt.datetime.fromisoformat(line["expires_at"])
    while dt.datetime.now(dt.UTC) < deadline:
        select.select([], [], [], 0.1)
    target = {"DATA_DIR": str(tmp_path / "target")}
    result = cli(target, "import", cwd=tmp_path, stdin=data)
    assert result.returncode == 0
    assert "secrets 0 new, 0 already there, 0 with fewer reads left, 1 expired" in (
        result.stderr.decode()
    )
    assert stored_keys(target) == set()


def test_export_of_a_data_dir_without_a_store_is_refused_and_writes_no_file(
    tmp_path: Path,
) -> None:
    result = cli({"DATA_DIR": str(tmp_path / "nothing")}, "export", "-o", "x", cwd=tmp_path)
    assert result.returncode == 2
    assert "holds no vault.db" in result.stderr.decode()
    assert not (tmp_path / "nothing").exists()
    assert not list(tmp_path.glob("x*"))


def run_on_terminal(env: dict[str, str], *args: str, cwd: Path) -> tuple[int, str]:
    """Run with standard error on a pseudo-terminal; exit code and what it showed there."""
    controller, terminal = pty.openpty()
    # A terminal 120 columns wide (a new pseudo-terminal has none, and draws no bar).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "vault", *args],
        env=clean_env(**env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return process.wait(30), shown.decode(errors="replace")


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
def test_progress_shows_on_a_terminal_and_the_summary_stays(
    population: Population, store_env: dict[str, str], tmp_path: Path
) -> None:
    code, shown = run_on_terminal(
        without_keys(store_env), "export", "--audit", "--output", "b.jsonl", cwd=tmp_path
    )
    assert code == 0, shown
    assert "exporting" in shown and "records" in shown and "/s" in shown
    assert shown.rstrip().splitlines()[-1].startswith("secret-manager: exported ")
    # Not a terminal: the summary alone.
    result = cli({"DATA_DIR": str(tmp_path / "t")}, "import", "--input", "b.jsonl", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr.decode().count("\n") == 1


def create_over_http(url: str, count: int) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """``count`` secrets, a third expiring, a third read-limited (3 reads, one taken)."""
    made: dict[str, tuple[bytes, dict[str, Any]]] = {}
    with httpx.Client(base_url=url, timeout=10) as client:
        for n in range(count):
            plaintext = os.urandom(16)
            fields: dict[str, Any] = (
                {"ttl_seconds": 3600} if n % 3 == 1 else {"max_reads": 3} if n % 3 == 2 else {}
            )
            answer = client.post("/vault/secret/create", json={"secret": b64(plaintext), **fields})
            assert answer.status_code == 200
            made[answer.json()["secret_id"]] = (plaintext, answer.json())
            if "max_reads" in fields:
                read = client.post(
                    "/vault/secret/fetch", json={"secret_id": answer.json()["secret_id"]}
                )
                assert read.json()["reads_left"] == 2
    return made


def fetch_all(url: str, made: dict[str, tuple[bytes, dict[str, Any]]]) -> dict[str, int]:
    """Fetch every secret once; assert each is served as created. Reads left, by id."""
    reads: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=10) as client:
        for secret_id, (plaintext, created) in made.items():
            got = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
            assert got.status_code == 200, (got.status_code, got.text)
            assert got.json()["secret"] == b64(plaintext)
            assert got.json().get("expires_at") == created.get("expires_at")
            if "reads_left" in got.json():
                reads[secret_id] = got.json()["reads_left"]
    return reads


def summary_counts(summary: str) -> dict[str, int]:
    """The numbers of an import's summary line, by what they count."""
    found = re.search(
        r"secrets (\d+) new, (\d+) already there, (\d+) with fewer reads left, (\d+) expired "
        r"since the export, (\d+) conflicts; audit records (\d+) new, (\d+) already there",
        summary,
    )
    assert found is not None, summary
    names = ("new", "present", "fewer_reads", "expired", "conflicts", "audit_new", "audit_present")
    return dict(zip(names, map(int, found.groups()), strict=True))


def test_migration_sqlite_to_mongodb_and_back_serves_every_secret(
    start_server: Callable[..., Any], tmp_path: Path, mongo_uri: str, master_key: str
) -> None:
    sqlite_env = {"DATA_DIR": str(tmp_path / "laptop")}
    mongo_env = other_store("mongo", tmp_path, mongo_uri, "")
    back_env = {"DATA_DIR": str(tmp_path / "back")}
    key = {"MASTER_KEY": master_key}

    laptop = start_server({**sqlite_env, **key})
    made = create_over_http(laptop.url, 60)
    laptop.stop()

    _, to_mongo = pipe(sqlite_env, mongo_env, cwd=tmp_path)
    counts = summary_counts(to_mongo)
    assert counts["new"] == 60 and counts["present"] == counts["conflicts"] == 0
    assert counts["audit_new"] == 80  # 60 creates and 20 fetches
    swarm = start_server({**mongo_env, **key})
    reads = fetch_all(swarm.url, made)
    assert len(reads) == 20 and set(reads.values()) == {1}  # 3 reads, one taken before
    swarm.stop()

    _, back = pipe(mongo_env, back_env, cwd=tmp_path)
    counts = summary_counts(back)
    assert counts["new"] == 60 and counts["audit_new"] >= 80 + 60
    laptop_again = start_server({**back_env, **key})
    reads = fetch_all(laptop_again.url, made)
    assert set(reads.values()) == {0}  # the last read of each, which deletes it
    print(f"migration: sqlite->mongodb {to_mongo.strip()}\nmongodb->sqlite {back.strip()}")


def test_a_live_export_is_whole_and_a_second_pass_carries_what_came_after(
    start_server: Callable[..., Any], tmp_path: Path, mongo_uri: str, master_key: str
) -> None:
    source = {"DATA_DIR": str(tmp_path / "old")}
    target = other_store("mongo", tmp_path, mongo_uri, "")
    server = start_server({**source, "MASTER_KEY": master_key, "RATE_LIMIT": "off"})
    made: dict[str, bytes] = {}
    stop = threading.Event()

    def keep_creating() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not stop.is_set():
                plaintext = os.urandom(16)
                answer = client.post("/vault/secret/create", json={"secret": b64(plaintext)})
                if answer.status_code == 200:
                    made[answer.json()["secret_id"]] = plaintext

    creator = threading.Thread(target=keep_creating)
    creator.start()
    try:
        wait_until(lambda: len(made) >= 50, 30, "50 creates")
        _, first = pipe(source, target, cwd=tmp_path)  # while creates keep coming
        after_first = len(made)
        wait_until(lambda: len(made) >= after_first + 20, 30, "20 more creates")
    finally:
        stop.set()
        creator.join()
    assert server.stop() == 0  # the cut-over: writes stop here
    first_counts = summary_counts(first)
    assert first_counts["new"] >= 50 and first_counts["conflicts"] == 0

    _, second = pipe(source, target, cwd=tmp_path)
    second_counts = summary_counts(second)
    assert second_counts["present"] == first_counts["new"]
    assert second_counts["new"] == len(made) - first_counts["new"] >= 20
    new_home = start_server({**target, "MASTER_KEY": master_key, "RATE_LIMIT": "off"})
    with httpx.Client(base_url=new_home.url, timeout=10) as client:
        for secret_id, plaintext in made.items():
            got = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
            assert got.status_code == 200 and got.json()["secret"] == b64(plaintext)
    print(
        f"live migration: {len(made)} acknowledged; pass 1 {first.strip()}; pass 2 {second.strip()}"
    )


def destroy(env: dict[str, str]) -> None:
    """Lose the store: the SQLite directory, or the MongoDB database."""
    if "MONGO_URI" in env:
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            client.drop_database(env["MONGO_DB"])
    else:
        shutil.rmtree(env["DATA_DIR"])


def test_restore_drill_back_up_destroy_restore_fetch_everything(
    start_server: Callable[..., Any],
    store_kind: str,
    tmp_path: Path,
    mongo_uri: str,
    master_key: str,
) -> None:
    store = other_store(store_kind, tmp_path, mongo_uri, "data")
    server = start_server({**store, "MASTER_KEY": master_key})
    made = create_over_http(server.url, 30)
    backup = cli(store, "export", "--audit", "--output", "backup.jsonl", cwd=tmp_path)
    assert backup.returncode == 0, backup.stderr
    server.stop()

    destroy(store)
    assert store_is_untouched(store)
    restored = cli(store, "import", "--input", "backup.jsonl", cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    counts = summary_counts(restored.stderr.decode())
    assert counts["new"] == 30 and counts["audit_new"] == 40

    server = start_server({**store, "MASTER_KEY": master_key})
    reads = fetch_all(server.url, made)
    assert set(reads.values()) == {1}


# --- who may see a secret: tenant, owner, readers --------------------------------------


@dataclasses.dataclass(frozen=True)
class Guarded:
    """A secret stored for a tenant and named readers, by its id and plaintext."""

    secret_id: str
    plaintext: bytes
    tenant: str
    owner: str | None
    readers: tuple[str, ...] | None


# A plain secret; one of the default tenant for a reader the importing server knows, and
# one for a reader it does not; one of another tenant (no key of which exists today).
GUARDED = (
    ("default", None, None),
    ("default", "ci", ("ci",)),
    ("default", "ci", ("ci", "auditor")),
    ("acme", "billing", ("billing", "deployer")),
)
# The importing server's keys: "ci" only, in the default tenant.
CI_KEY = "ci:" + "c" * 40


def store_guarded(env: dict[str, str]) -> list[Guarded]:
    """``GUARDED`` sealed under ``env``'s key and stored below the service, with an audit
    record of tenant acme."""
    keyring = Keyring(parse_key(env["MASTER_KEY"]))
    made = [
        Guarded(str(uuid.uuid4()), os.urandom(24), tenant, owner, readers)
        for tenant, owner, readers in GUARDED
    ]

    async def insert(store: SecretStore) -> None:
        for secret in made:
            await store.insert(
                keyring.seal(
                    record_key(secret.secret_id),
                    secret.plaintext,
                    tenant=secret.tenant,
                    owner=secret.owner,
                    readers=secret.readers,
                )
            )
        audit = dataclasses.replace(audit_record("acme-request"), tenant="acme")
        assert await store.insert_audit(dataclasses.replace(audit, api_key_name="billing")) is None

    on_store(env, insert)
    return made


def fetch_as(env: dict[str, str], secret_id: str, caller: Caller) -> Fetched:
    """What a fetch by ``caller`` finds in the store ``env`` names, opened with its key."""
    keyring = Keyring(parse_key(env["MASTER_KEY"]))

    async def fetch(store: SecretStore) -> Fetched:
        fetched, _ = await store.fetch(secret_id, keyring, None, caller)
        return fetched

    result: Fetched = on_store(env, fetch)
    return result


def test_export_and_import_carry_tenant_owner_and_readers_between_the_stores_unchanged(
    store_kind: str, store_env: dict[str, str], tmp_path: Path, mongo_uri: str
) -> None:
    made = store_guarded(store_env)
    exported = cli(without_keys(store_env), "export", "--audit", "-o", "b.jsonl", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    data = (tmp_path / "b.jsonl").read_bytes()
    by_key = {line["record_key"]: line for line in secret_lines(data)}
    for secret in made:
        line = by_key[record_key(secret.secret_id)]
        if secret.readers is None:  # a plain secret: the line earlier releases wrote
            assert set(line) == EXPORT_FIELDS
            continue
        assert set(line) - EXPORT_FIELDS == {"owner", "readers"} | (
            {"tenant"} if secret.tenant != "default" else set()
        )
        assert line.get("tenant", "default") == secret.tenant
        assert (line["owner"], tuple(line["readers"])) == (secret.owner, secret.readers)
    audit = [line for line in lines(data) if line.get("type") == "audit"]
    assert [(line["tenant"], line["api_key_name"]) for line in audit] == [("acme", "billing")]

    target = other_store("mongo" if store_kind == "sqlite" else "sqlite", tmp_path, mongo_uri, "t")
    imported = cli({**target, "API_KEYS": CI_KEY}, "import", "-i", "b.jsonl", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    summary = imported.stderr.decode()
    assert summary.count("\n") == 1
    assert summary_counts(summary)["new"] == len(made)
    # The one naming "auditor" and acme's: no key of theirs is configured; stored anyway.
    assert (
        "; 2 secrets name readers that are no API key of their tenant here: stored as they "
        "are, and a reader fetches them once its key is configured"
    ) in summary
    assert stored_keys(target) == keys_of(*(secret.secret_id for secret in made))

    # Exported again from the target: every line exactly as it left the source.
    again = cli(without_keys(target), "export", "--audit", cwd=tmp_path).stdout
    assert sorted(map(json.dumps, secret_lines(again))) == sorted(
        map(json.dumps, secret_lines(data))
    )
    audit_again = [line for line in lines(again) if line.get("type") == "audit"]
    # (ts aside: MongoDB keeps it to the millisecond)
    assert [(a["record_id"], a["tenant"]) for a in audit_again] == [
        (a["record_id"], a["tenant"]) for a in audit
    ]

    key = {"MASTER_KEY": store_env["MASTER_KEY"]}
    for secret in made:
        reader = Caller(secret.tenant, None if secret.readers is None else secret.readers[-1])
        fetched = fetch_as({**target, **key}, secret.secret_id, reader)
        assert (fetched.found, fetched.plaintext) == (Found.SECRET, secret.plaintext)
        assert fetched.record is not None
        assert (fetched.record.tenant, fetched.record.owner, fetched.record.readers) == (
            secret.tenant,
            secret.owner,
            secret.readers,
        )
        elsewhere = Caller("other" if secret.tenant == "default" else "default", reader.name)
        assert fetch_as({**target, **key}, secret.secret_id, elsewhere).found is Found.DENIED
        if secret.readers is not None:
            stranger = Caller(secret.tenant, "stranger")
            assert fetch_as({**target, **key}, secret.secret_id, stranger).found is Found.DENIED


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
def test_without_api_keys_every_secret_for_named_readers_is_counted_and_stored(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    made = store_guarded(store_env)
    data = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    target = {"DATA_DIR": str(tmp_path / "target")}

    first = cli(target, "import", cwd=tmp_path, stdin=data)
    assert first.returncode == 0, first.stderr
    assert (
        "; 3 secrets are for named readers and this server has no API keys: stored as they "
        "are, and only those readers' keys, once configured, fetch them"
    ) in first.stderr.decode()
    # Already there the second time, and still counted: the store holds them as they are.
    second = cli(target, "import", cwd=tmp_path, stdin=data)
    assert summary_counts(second.stderr.decode())["present"] == len(made)
    assert "; 3 secrets are for named readers" in second.stderr.decode()


def export_file(*records: dict[str, Any], version: int = 2) -> bytes:
    """A whole export file of ``records`` (secret and audit lines), with its end line."""

    def line(value: dict[str, Any]) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode() + b"\n"

    header = {"format": "secret-manager-export", "version": version, "store": "sqlite"}
    data = line({**header, "exported_at": "2026-01-01T00:00:00.000000Z", "audit": True})
    data += b"".join(line(record) for record in records)
    secrets = sum(record["type"] == "secret" for record in records)
    end = {"type": "end", "secrets": secrets, "audit": len(records) - secrets}
    return data + line({**end, "sha256": hashlib.sha256(data).hexdigest()})


def a_secret_line(master_key: str, secret_id: str, plaintext: bytes) -> dict[str, Any]:
    """A plain secret's line, as this release and the one before write it."""
    sealed = Keyring(parse_key(master_key)).seal(record_key(secret_id), plaintext)
    return {
        "type": "secret",
        "record_key": sealed.record_key,
        "key_id": sealed.key_id,
        "nonce": b64(sealed.nonce),
        "ciphertext": b64(sealed.ciphertext),
        "created_at": "2026-01-01T00:00:00.000000Z",
        "expires_at": None,
        "reads_left": None,
    }


# An audit line as the release before tenants wrote it: no "tenant".
OLD_AUDIT_LINE = {
    "type": "audit",
    "ts": "2026-01-01T00:00:00.123000Z",  # whole milliseconds: MongoDB keeps no more
    "op": "fetch",
    "status": 404,
    "outcome": "not_found",
    "client_ip": "10.0.0.1",
    "request_id": "r-1",
    "secret_id_hmac": None,
    "latency_ms": 1.5,
    "user_agent": None,
    "api_key_name": None,
    "record_id": "0123456789abcdef01234567",
}


def test_a_file_written_before_tenants_existed_is_imported_as_plain_secrets(
    make_client: Callable[..., TestClient],
    store_env: dict[str, str],
    master_key: str,
    tmp_path: Path,
) -> None:
    secret_id, plaintext = str(uuid.uuid4()), os.urandom(16)
    data = export_file(a_secret_line(master_key, secret_id, plaintext), OLD_AUDIT_LINE)

    result = cli(without_keys(store_env), "import", cwd=tmp_path, stdin=data)
    assert result.returncode == 0, result.stderr
    counts = summary_counts(result.stderr.decode())
    assert (counts["new"], counts["audit_new"]) == (1, 1)
    assert "readers" not in result.stderr.decode()
    got = make_client().post("/vault/secret/fetch", json={"secret_id": secret_id})
    assert got.status_code == 200 and got.json()["secret"] == b64(plaintext)
    # Exported again, both lines are what they were (the audit line without a tenant).
    again = cli(without_keys(store_env), "export", "--audit", cwd=tmp_path).stdout
    assert secret_lines(again) == secret_lines(data)
    assert OLD_AUDIT_LINE in lines(again)


NAME_RULE = "1-64 characters of A-Z a-z 0-9 . _ -"
BAD_ACCESS: dict[str, tuple[dict[str, Any], str]] = {
    "empty tenant": ({"tenant": ""}, "tenant is not a tenant name"),
    "null tenant": ({"tenant": None}, "tenant is not a tenant name"),
    "tenant with a slash": ({"tenant": "acme/x"}, "tenant is not a tenant name"),
    "tenant too long": ({"tenant": "t" * 65}, "tenant is not a tenant name"),
    "owner not text": ({"owner": 7}, "owner is not a key name"),
    "owner with a comma": ({"owner": "a,b"}, "owner is not a key name"),
    "readers not a list": ({"readers": "ci"}, "readers is not a JSON array of 1 to 100"),
    "no readers": ({"readers": []}, "readers is not a JSON array of 1 to 100"),
    "101 readers": (
        {"readers": [f"r{n}" for n in range(101)]},
        "readers is not a JSON array of 1 to 100",
    ),
    "a reader not text": ({"readers": ["ci", 1]}, "readers holds something that is not"),
    "a reader with a NUL": ({"readers": ["c\u0000i"]}, "readers holds something that is not"),
    "a non-ASCII reader": ({"readers": ["cï"]}, "readers holds something that is not"),
    "a reader twice": ({"readers": ["ci", "ops", "ci"]}, "readers names a key more than once"),
}


@pytest.mark.parametrize("bad", sorted(BAD_ACCESS))
def test_a_malformed_tenant_owner_or_reader_is_refused_naming_its_line(
    bad: str, master_key: str, tmp_path: Path
) -> None:
    fields, reason = BAD_ACCESS[bad]
    good = a_secret_line(master_key, str(uuid.uuid4()), b"fine")
    line = {**a_secret_line(master_key, str(uuid.uuid4()), b"x"), **fields}
    target = {"DATA_DIR": str(tmp_path / "target")}
    result = cli(target, "import", cwd=tmp_path, stdin=export_file(good, OLD_AUDIT_LINE, line))
    assert result.returncode == 2
    message = result.stderr.decode()
    assert message.count("\n") == 1, message
    assert f"refused standard input: line 4: {reason}" in message
    assert message.rstrip().endswith("nothing was written")
    for value in fields.values():  # named by its field and line, never its value
        if isinstance(value, str) and value:
            assert value not in message
    assert store_is_untouched(target)


def test_well_formed_access_fields_and_an_audit_tenant_are_read_as_written(
    master_key: str,
) -> None:
    line = {
        **a_secret_line(master_key, str(uuid.uuid4()), b"x"),
        "tenant": "acme",
        "owner": "billing",
        "readers": [f"r-{n}.x_" for n in range(100)],
    }
    record = transfer.parse_secret(line, 2)
    assert (record.sealed.tenant, record.sealed.owner) == ("acme", "billing")
    assert record.sealed.readers == tuple(line["readers"])
    assert transfer.secret_line(record) == line
    # Explicit nulls and the default tenant read as a plain secret's; written as one.
    plain = {**line, "tenant": "default", "owner": None, "readers": None}
    written = {name: value for name, value in line.items() if name in EXPORT_FIELDS}
    assert transfer.secret_line(transfer.parse_secret(plain, 2)) == written
    # An audit line with a tenant keeps it; one without has none; a tenant must be text.
    assert transfer.parse_audit({**OLD_AUDIT_LINE, "tenant": "acme"}, 2)["tenant"] == "acme"
    assert transfer.parse_audit(OLD_AUDIT_LINE, 2)["tenant"] is None
    with pytest.raises(TransferRefused, match=r"^line 2: tenant is not text or null$"):
        transfer.parse_audit({**OLD_AUDIT_LINE, "tenant": 5}, 2)
    # A format 1 file was written before these fields: there, they are no field at all.
    v1 = {k: v for k, v in line.items() if k != "record_key"} | {"secret_id": str(uuid.uuid4())}
    with pytest.raises(TransferRefused, match=r"^line 2 is not a whole secret record"):
        transfer.parse_secret(v1, 2, version=1)


def edit_access(env: dict[str, str], secret_id: str, **fields: Any) -> None:
    """Overwrite who may see a stored secret, below the service (a database edit)."""
    key = record_key(secret_id)
    if "MONGO_URI" in env:
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            client[env["MONGO_DB"]]["secrets"].update_one({"_id": key}, {"$set": fields})
        return
    import sqlite3

    if "readers" in fields and not isinstance(fields["readers"], str):
        fields["readers"] = json.dumps(fields["readers"])
    with sqlite3.connect(Path(env["DATA_DIR"]) / "vault.db") as conn:
        for name, value in fields.items():
            conn.execute(
                f"UPDATE secrets SET {name} = ? WHERE record_key = ?",  # noqa: S608 - test names
                (value, key),
            )


def test_an_export_leaves_out_a_secret_whose_access_fields_were_edited_malformed(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    made = store_guarded(store_env)
    moved, doubled = made[1], made[3]
    edit_access(store_env, moved.secret_id, tenant="not a tenant")
    edit_access(store_env, doubled.secret_id, readers=["billing", "billing"])

    result = cli(without_keys(store_env), "export", "-o", "b.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "exported 2 secrets" in result.stderr.decode()
    assert "(2 expired or used up, left out)" in result.stderr.decode()
    data = (tmp_path / "b.jsonl").read_bytes()
    assert {line["record_key"] for line in secret_lines(data)} == keys_of(
        made[0].secret_id, made[2].secret_id
    )
    # The file those two make is whole: an import takes it.
    imported = cli({"DATA_DIR": str(tmp_path / "t")}, "import", "-i", "b.jsonl", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert summary_counts(imported.stderr.decode())["new"] == 2


@pytest.mark.parametrize("store_kind", ["sqlite", "mongo"], indirect=True)
def test_a_secret_whose_readers_are_no_list_is_left_out_and_an_import_leaves_it_alone(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    made = store_guarded(store_env)
    whole = cli(without_keys(store_env), "export", cwd=tmp_path).stdout
    broken = made[2]
    # Not an array of names at all (SQLite: not even JSON).
    edit_access(store_env, broken.secret_id, readers="not json")

    result = cli(without_keys(store_env), "export", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert record_key(broken.secret_id) not in {
        line["record_key"] for line in lines(result.stdout)[1:-1]
    }
    assert "exported 3 secrets" in result.stderr.decode()
    # The file from before the edit, imported back: that record is a conflict, untouched.
    again = cli(without_keys(store_env), "import", cwd=tmp_path, stdin=whole)
    assert again.returncode == 1, again.stderr
    counts = summary_counts(again.stderr.decode())
    assert (counts["present"], counts["conflicts"]) == (3, 1)
    assert fetch_as(store_env, made[0].secret_id, Caller()).found is Found.SECRET
    with pytest.raises(CorruptRecord):
        fetch_as(store_env, broken.secret_id, Caller("default", "ci"))
