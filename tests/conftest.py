"""Shared fixtures: a real MongoDB-wire server, settings for either store, app clients.

MongoDB tests talk to a real mongod when TEST_MONGO_URI is set, otherwise to an nx-27017
server (a MongoDB wire-protocol server over SQLite) started here on a free port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pymongo
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.testclient import TestClient

from loadtests.mongo import mongo_answers
from loadtests.processes import ClusterError, free_port, wait_for
from observability.audit import AuditRecord
from vault.app import create_app
from vault.backend import backend_for
from vault.crypto import generate_key
from vault.records import SealedSecret, record_key
from vault.settings import Settings
from vault.stores.base import SecretStore

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any key, MongoDB or client URL setting, plus extra."""
    prefixes = ("MASTER_KEY", "MONGO", "SECRET_MANAGER_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """The harness's poll loop, failing the test (not the harness) when time runs out."""
    try:
        wait_for(predicate, timeout, what)
    except ClusterError as exc:
        raise AssertionError(str(exc)) from None


class MongoWireServer:
    """An nx-27017 process with its own files, stoppable and restartable on the same port."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        d = self.directory
        self.process = subprocess.Popen(
            [
                "nx-27017",
                # One file per logical database, so tests isolate by database name.
                "--data-dir", str(d / "data"),
                "-p", str(self.port),
                "--log-file", str(d / "nx.log"),
                "--pid-file", str(d / "nx.pid"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: mongo_answers(self.uri), 20, "nx-27017 to answer ping")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Freeze the server: connections stay open but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests run on asyncio, the loop Hypercorn serves the app on."""
    return "asyncio"


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB-wire server shared by the session (tests isolate by database name)."""
    given = os.environ.get("TEST_MONGO_URI")
    if given:
        yield given
        return
    server = MongoWireServer(tmp_path_factory.mktemp("nx"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def own_mongo(tmp_path: Path) -> Iterator[MongoWireServer]:
    """A MongoDB-wire server of this test's own, which the test may stop and restart."""
    directory = tmp_path / "own-nx"
    directory.mkdir()
    server = MongoWireServer(directory)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.resume()
        server.stop()


@pytest.fixture
def master_key() -> str:
    return generate_key()


@pytest.fixture(params=["sqlite", "mongo"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_env(
    request: pytest.FixtureRequest, store_kind: str, tmp_path: Path, master_key: str
) -> dict[str, str]:
    """Environment for a server on the store under test, with a fresh database."""
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")}
    if store_kind == "mongo":
        env["MONGO_URI"] = request.getfixturevalue("mongo_uri")
        env["MONGO_DB"] = "t" + uuid.uuid4().hex[:16]
    return env


@pytest.fixture
def make_client(store_env: dict[str, str]) -> Iterator[Callable[..., TestClient]]:
    """Build in-process clients (lifespan run) for the store under test; env overrides."""
    clients: list[TestClient] = []

    def make(**overrides: str) -> TestClient:
        client = TestClient(create_app(Settings.from_env({**store_env, **overrides})))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@dataclass
class RawRecords:
    """Direct access to stored records, below the service, to inspect or tamper with them."""

    kind: str
    env: dict[str, str]
    _client: Any = None

    def _sqlite(self) -> sqlite3.Connection:
        return sqlite3.connect(Path(self.env["DATA_DIR"]) / "vault.db", isolation_level=None)

    def _mongo(self) -> Any:
        if self._client is None:
            self._client = pymongo.MongoClient(self.env["MONGO_URI"])
        return self._client[self.env["MONGO_DB"]]["secrets"]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def get(self, secret_id: str) -> dict[str, Any]:
        """The record's stored fields: key_id, nonce, ciphertext."""
        key = record_key(secret_id)
        if self.kind == "sqlite":
            with self._sqlite() as conn:
                row = conn.execute(
                    "SELECT key_id, nonce, ciphertext FROM secrets WHERE record_key = ?",
                    (key,),
                ).fetchone()
            assert row is not None
            return {"key_id": row[0], "nonce": bytes(row[1]), "ciphertext": bytes(row[2])}
        doc = self._mongo().find_one({"_id": key})
        assert doc is not None
        return {"key_id": doc["kid"], "nonce": bytes(doc["nonce"]), "ciphertext": bytes(doc["ct"])}

    def sealed(self, secret_id: str) -> SealedSecret | None:
        """The whole stored record, lifecycle included, read from its row or document."""
        key = record_key(secret_id)
        if self.kind == "sqlite":
            with self._sqlite() as conn:
                row = conn.execute(
                    "SELECT key_id, nonce, ciphertext, expires_at, reads_left FROM secrets"
                    " WHERE record_key = ?",
                    (key,),
                ).fetchone()
            if row is None:
                return None
            key_id, nonce, ciphertext, expires_at, reads_left = row
        else:
            doc = self._mongo().find_one({"_id": key})
            if doc is None:
                return None
            key_id, nonce, ciphertext = doc["kid"], doc["nonce"], doc["ct"]
            expires_at, reads_left = doc.get("expires_at"), doc.get("reads_left")
            if isinstance(expires_at, dt.datetime):
                expires_at = int(expires_at.replace(tzinfo=dt.UTC).timestamp())
        return SealedSecret(
            key,
            key_id,
            bytes(nonce),
            bytes(ciphertext),
            expires_at=None
            if expires_at is None
            else dt.datetime.fromtimestamp(expires_at, dt.UTC),
            reads_left=reads_left,
        )

    def put(self, secret_id: str, fields: dict[str, Any]) -> None:
        """Overwrite the stored fields of an existing record."""
        key = record_key(secret_id)
        if self.kind == "sqlite":
            with self._sqlite() as conn:
                conn.execute(
                    "UPDATE secrets SET key_id = ?, nonce = ?, ciphertext = ? WHERE record_key = ?",
                    (fields["key_id"], fields["nonce"], fields["ciphertext"], key),
                )
            return
        update = {"kid": fields["key_id"], "nonce": fields["nonce"], "ct": fields["ciphertext"]}
        self._mongo().update_one({"_id": key}, {"$set": update})

    def key_ids(self) -> dict[str, str]:
        """The key id that sealed each stored record, by record key."""
        if self.kind == "sqlite":
            with self._sqlite() as conn:
                return dict(conn.execute("SELECT record_key, key_id FROM secrets").fetchall())
        return {str(doc["_id"]): doc["kid"] for doc in self._mongo().find({}, {"kid": 1})}

    def record_keys(self) -> set[str]:
        """The keys every stored secret is stored under (``keys_of`` names them by id)."""
        if self.kind == "sqlite":
            with self._sqlite() as conn:
                return {row[0] for row in conn.execute("SELECT record_key FROM secrets")}
        return {str(doc["_id"]) for doc in self._mongo().find({}, {"_id": 1})}

    def dump(self) -> bytes:
        """Every byte the store holds for this service, to search for plaintext."""
        if self.kind == "sqlite":
            data_dir = Path(self.env["DATA_DIR"])
            return b"".join(p.read_bytes() for p in sorted(data_dir.glob("vault.db*")))
        return b"".join(repr(doc).encode() for doc in self._mongo().find({}))


@pytest.fixture
def raw_records(store_kind: str, store_env: dict[str, str]) -> Iterator[RawRecords]:
    records = RawRecords(store_kind, store_env)
    yield records
    records.close()


# The secret id of each record stored_record made, by record key: a record keeps only the
# digest of its id, as the service stores it.
_IDS: dict[str, str] = {}


def stored_record(secret_id: str | None = None, **fields: Any) -> SealedSecret:
    """A record of random bytes, keyed as the service keys one: by the digest of a secret id
    (a new one unless given), which ``id_of`` gives back."""
    secret_id = secret_id or str(uuid.uuid4())
    key = record_key(secret_id)
    _IDS[key] = secret_id
    fields.setdefault("key_id", "0123456789abcdef")
    fields.setdefault("nonce", os.urandom(12))
    fields.setdefault("ciphertext", os.urandom(40))
    return SealedSecret(record_key=key, **fields)


def id_of(record: SealedSecret) -> str:
    """The secret id a record from ``stored_record`` is keyed by (the digest of)."""
    return _IDS[record.record_key]


def keys_of(*secret_ids: str) -> set[str]:
    """The record keys the secrets of ``secret_ids`` are stored under."""
    return {record_key(secret_id) for secret_id in secret_ids}


def write_legacy(env: dict[str, str], records: list[SealedSecret]) -> None:
    """Write ``records`` below the service as the previous version stored them: under their
    secret id (each record's ``record_key`` is the id, which its ciphertext is bound to).
    An SQLite file made here has that version's schema (a ``secret_id`` column); MongoDB
    gets documents of format ``v`` 1."""
    now = dt.datetime.now(dt.UTC)
    if "MONGO_URI" in env:
        docs = []
        for r in records:
            doc: dict[str, Any] = {"_id": r.record_key, "v": 1, "kid": r.key_id}
            doc |= {"nonce": r.nonce, "ct": r.ciphertext, "created_at": now}
            if r.expires_at is not None:
                doc["expires_at"] = r.expires_at
            if r.reads_left is not None:
                doc["reads_left"] = r.reads_left
            docs.append(doc)
        with pymongo.MongoClient(env["MONGO_URI"]) as client:
            client[env["MONGO_DB"]]["secrets"].insert_many(docs)
        return
    path = Path(env["DATA_DIR"]) / "vault.db"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS secrets (secret_id TEXT PRIMARY KEY,"
            " key_id TEXT NOT NULL, nonce BLOB NOT NULL, ciphertext BLOB NOT NULL,"
            " created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),"
            " expires_at INTEGER, reads_left INTEGER) WITHOUT ROWID"
        )
        columns = {row[1] for row in conn.execute("PRAGMA table_info(secrets)")}
        key = "secret_id" if "secret_id" in columns else "record_key"  # upgraded since
        conn.executemany(
            f"INSERT INTO secrets ({key}, key_id, nonce, ciphertext, expires_at, reads_left)"  # noqa: S608
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    r.record_key,
                    r.key_id,
                    r.nonce,
                    r.ciphertext,
                    None if r.expires_at is None else int(r.expires_at.timestamp()),
                    r.reads_left,
                )
                for r in records
            ],
        )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux): a server's workers and resource tracker."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def worker_processes(pid: int) -> list[int]:
    """The worker processes of a server (not multiprocessing's resource tracker)."""
    return [c for c in children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process; an exited one may linger as a zombie unreaped."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rpartition(")")[2].split()[0] != "Z"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for ``localhost`` and its key, as PEM files in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class HTTPProcess:
    """A server subprocess on a free loopback port, its output in a log file; with ``tls``
    (a client context trusting its certificate), served over HTTPS as ``localhost``."""

    def __init__(
        self,
        command: list[str],
        *,
        log: Path,
        probe: str,
        env: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.port = free_port()
        self.tls = tls
        self.url = (
            f"https://localhost:{self.port}" if tls is not None else f"http://127.0.0.1:{self.port}"
        )
        self.log = log
        self._log_handle = self.log.open("wb")
        self.process = subprocess.Popen(
            [part.format(port=self.port) for part in command],
            env=env,
            cwd=log.parent,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self._answers(probe), 30, f"{command[0]} on {self.url} to answer")

    def _answers(self, probe: str) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.process.args!r} exited early: {self.log.read_text()}")
        try:
            verify = self.tls if self.tls is not None else True
            return httpx.get(self.url + probe, timeout=1, verify=verify).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log_handle.close()
        return code

    def output(self) -> str:
        return self.log.read_text()


class ServerProcess(HTTPProcess):
    """A real ``secret-manager serve`` subprocess; with ``tls=True``, serving HTTPS itself
    (TLS_CERT_FILE and TLS_KEY_FILE: a throwaway certificate made in ``cwd``)."""

    def __init__(
        self, env: dict[str, str], args: list[str], cwd: Path, *, tls: bool = False
    ) -> None:
        context = None
        if tls:
            cert, key = self_signed(cwd)
            env = {**env, "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}
            context = ssl.create_default_context(cafile=str(cert))
        self.env = env  # what it was started with, beyond the clean environment
        super().__init__(
            [sys.executable, "-m", "vault", "serve", "--port", "{port}", *args],
            log=cwd / f"serve-{uuid.uuid4().hex[:8]}.log",
            probe="/healthz",
            env=clean_env(**env),
            tls=context,
        )


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers: ``start_server(env, *args)``; all are stopped at teardown."""
    servers: list[ServerProcess] = []

    def start(env: dict[str, str], *args: str) -> ServerProcess:
        server = ServerProcess(env, list(args), tmp_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def start_replicas(
    start_server: Callable[..., ServerProcess], mongo_uri: str, master_key: str, tmp_path: Path
) -> Callable[..., tuple[list[ServerProcess], dict[str, str]]]:
    """``start_replicas(**env)``: two real servers sharing one fresh MongoDB database, as
    replicas do (an SQLite file is one host's, so replicas are MongoDB's), rate limit off;
    the servers and the environment they share."""

    def start(**extra: str) -> tuple[list[ServerProcess], dict[str, str]]:
        env = {
            "MASTER_KEY": master_key,
            "MONGO_URI": mongo_uri,
            "MONGO_DB": "t" + uuid.uuid4().hex[:16],
            "RATE_LIMIT": "off",
            **extra,
        }
        servers = [start_server({**env, "DATA_DIR": str(tmp_path / f"r{n}")}) for n in (1, 2)]
        return servers, env

    return start


def audit_record(request_id: str) -> AuditRecord:
    """An audit record of a refused fetch, told apart by its request id."""
    return AuditRecord(
        ts=dt.datetime.now(dt.UTC),
        op="fetch",
        status=404,
        outcome="not_found",
        client_ip="10.0.0.1",
        request_id=request_id,
        secret_id_hmac=None,
        latency_ms=1.0,
        user_agent=None,
    )


class ReadBack:
    """Opens a record by handing back its ciphertext: store tests read records of random
    bytes back through a real ``fetch`` without sealing real secrets."""

    def open(self, sealed: SealedSecret) -> bytes:
        return sealed.ciphertext


async def read_back(store: SecretStore, secret_id: str) -> SealedSecret | None:
    """The record a fetch of ``secret_id`` reads (taking a read of a read-limited one), or
    None when there is none or it expired; a corrupt record's error is raised."""
    fetched, _ = await store.fetch(secret_id, ReadBack())
    return fetched.record


def on_store(env: dict[str, str], work: Callable[[SecretStore], Awaitable[Any]]) -> Any:
    """Run ``await work(store)`` on a real store opened from ``env``, and close it."""

    async def main() -> Any:
        store: SecretStore = backend_for(Settings.from_env(env)).open()
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(main())
