"""Locust scenarios for secret-manager: roundtrip, create burst, read-heavy (with deletes),
one-time secrets, and negative mixes.

The server under test needs ``RATE_LIMIT=off`` (or a limit far above the load): its default,
100 requests per second per client IP, refuses a load test that comes from one machine, and
every 429 counts here as a failure ("rate limited: start the server with RATE_LIMIT=off")::

    RATE_LIMIT=off MASTER_KEY=$(secret-manager genkey) secret-manager serve

Users (select them by class name; their tags only label the tasks: ``--tags`` alone would
leave the users of the other classes with no task, and each of their crashes fails the run);
none waits between tasks, so ``-u`` is the number of requests in flight:

=================  =============  ==========================================================
Class              Tag            What each user does
=================  =============  ==========================================================
RoundtripUser      ``roundtrip``  create a random secret (1..4096 bytes), fetch it, compare
CreateBurstUser    ``burst``      creates only; each must get 200 with a UUID secret_id
ReadHeavyUser      ``readheavy``  about 9 fetches (verified) per create, from its own pool;
                                  1 time in 11 it creates a secret, deletes it (200), and
                                  fetches it (404, counted as correct)
OneTimeUser        ``onetime``    create with ``max_reads: 1``, fetch (200, the secret,
                                  ``reads_left`` 0), fetch again (404, counted as correct)
NegativeUser       ``negative``   bad base64, invalid ``max_reads``, unknown or malformed
                                  ids (fetch and delete), oversized secrets, malformed JSON:
                                  each must get exactly its 400/404/413
=================  =============  ==========================================================

Web UI (http://localhost:8089; ``--class-picker`` lets you choose the users there)::

    locust -f loadtests/locustfile.py --host http://<swarm-node>:8000 --class-picker

Headless, one scenario at a time (the summary reports failures and requests per second);
the "20 concurrent creates" test is the CreateBurstUser line::

    locust -f loadtests/locustfile.py --headless -u 10 -r 10 -t 60s \\
        --host http://127.0.0.1:8000 RoundtripUser
    locust -f loadtests/locustfile.py --headless -u 20 -r 20 -t 30s \\
        --host http://127.0.0.1:8000 CreateBurstUser
    locust -f loadtests/locustfile.py --headless -u 20 -r 20 -t 60s \\
        --host http://127.0.0.1:8000 ReadHeavyUser
    locust -f loadtests/locustfile.py --headless -u 10 -r 10 -t 30s \\
        --host http://127.0.0.1:8000 OneTimeUser
    locust -f loadtests/locustfile.py --headless -u 5 -r 5 -t 30s \\
        --host http://127.0.0.1:8000 NegativeUser

The CI gate (all five scenarios; exit code 1 on any failed request)::

    locust -f loadtests/locustfile.py --headless -u 10 -r 10 -t 10s --host http://127.0.0.1:8000 \\
        RoundtripUser CreateBurstUser ReadHeavyUser OneTimeUser NegativeUser

Custom arguments (also editable in the web UI):

- ``--max-p95-ms 250``: exit code 1 when the p95 of all requests exceeds 250 ms (0, the
  default, sets no limit). With or without it, any failed request, or any exception raised
  in a user's task (a scenario that crashes stops counting requests), makes the exit code 1;
  otherwise it is 0. In the web UI the code is set when Locust quits (Ctrl-C, ``--autoquit``).
  For example::

      locust -f loadtests/locustfile.py --headless -u 10 -r 10 -t 60s \\
          --host http://127.0.0.1:8000 --max-p95-ms 250 RoundtripUser

- ``--max-secret-bytes 65536``: the server's ``MAX_SECRET_BYTES``; NegativeUser sends one
  byte more and expects 413.

``LOADTEST_ACK_FILE=acks.txt``: every create answered 200 (request name ``create``)
appends one line ``<secret_id> <sha256 hex of the plaintext>`` (one write and flush per
line, append mode, file mode 0600 as the ids are bearer capabilities), so a harness can
later fetch each acknowledged secret and prove none was lost. Secrets created to be deleted
or read once are named apart (``create (to delete)``, ``create (max_reads 1)``) and never
written there: they are meant to be gone when the run ends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
import uuid
from typing import IO, Any

from locust import FastHttpUser, constant, events, tag, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment
from locust.runners import WorkerRunner

CREATE_PATH = "/vault/secret/create/"
FETCH_PATH = "/vault/secret/fetch"
DELETE_PATH = "/vault/secret/delete"
ACK_FILE_VARIABLE = "LOADTEST_ACK_FILE"
DEFAULT_MAX_SECRET_BYTES = 65536
LARGEST_RANDOM_SECRET = 4096
READ_POOL_SIZE = 100
RATE_LIMITED = "rate limited: start the server with RATE_LIMIT=off"
# A used-up, deleted or expired secret must get exactly an unknown id's 404: no oracle.
UNKNOWN_ID_DETAIL = "no secret has this secret_id; check the id you were given"

# Each of these must be refused with 400 by the create endpoint.
INVALID_SECRETS: tuple[object, ...] = (
    "not base64!",
    "aGk",  # padding missing
    "aGk=\n",  # trailing newline
    "aG k=",  # whitespace inside
    "-_-_",  # url-safe alphabet
    "aGl=",  # not the canonical encoding of b"hi"
    "",  # empty secret
    12345,  # not a string
)
# Each of these must be refused with 400 by the fetch endpoint.
MALFORMED_IDS: tuple[object, ...] = (
    "not-a-uuid",
    "{00000000-0000-4000-8000-000000000000}",
    "urn:uuid:00000000-0000-4000-8000-000000000000",
    "00000000000040008000000000000000",
    None,
)
# Each of these must be refused with 400 as a create's max_reads (a JSON integer 1..1000000).
INVALID_MAX_READS: tuple[object, ...] = (0, -1, 1000001, 1.0, 2.5, True, "1", None)
# Bodies that are not a JSON object, or not valid JSON at all: 400 on both endpoints.
MALFORMED_BODIES = (
    '{"secret": "aGk="',
    "secret=aGk=",
    '["aGk="]',
    '{"secret": "aGk=", "secret": "aGk="}',
    "",  # no body at all
)

log = logging.getLogger("loadtests.locustfile")


class AckFile:
    """Appends ``<secret_id> <sha256 hex>`` for every acknowledged create to LOADTEST_ACK_FILE.

    Opened on first use, so each process (``--processes``, workers) opens its own handle after
    forking; one write and flush per line, in append mode, keeps lines whole across users and
    processes. Without the variable nothing is written.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def record(self, secret_id: str, plaintext: bytes) -> None:
        if not self.path:
            return
        if self._handle is None:
            self._handle = open(  # noqa: SIM115 - stays open for the life of the process
                self.path, "a", encoding="ascii", opener=_private_file
            )
        self._handle.write(f"{secret_id} {hashlib.sha256(plaintext).hexdigest()}\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _private_file(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


ACKS = AckFile(os.environ.get(ACK_FILE_VARIABLE))


def random_secret() -> bytes:
    return os.urandom(1 + secrets.randbelow(LARGEST_RANDOM_SECRET))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fail(response: ResponseContextManager, message: str) -> None:
    response.failure(message)  # type: ignore[no-untyped-call]


def _succeed(response: ResponseContextManager) -> None:
    response.success()  # type: ignore[no-untyped-call]


def _json_string(response: ResponseContextManager, field: str) -> str | None:
    """The string ``field`` of the response's JSON object, or None."""
    try:
        body = json.loads(response.content or b"")
    except ValueError:
        return None
    value = body.get(field) if isinstance(body, dict) else None
    return value if isinstance(value, str) else None


def _json_field(response: ResponseContextManager, field: str) -> object:
    """The value of ``field`` in the response's JSON object; None when absent or no object."""
    try:
        body = json.loads(response.content or b"")
    except ValueError:
        return None
    return body.get(field) if isinstance(body, dict) else None


def _same_count(answered: object, expected: int | None) -> bool:
    """Whether a JSON count is exactly ``expected`` (None: absent); ``true`` is not 1."""
    if expected is None:
        return answered is None
    return type(answered) is int and answered == expected


def _shape(value: object) -> str:
    """``value`` for a failure message: a small count as is, anything else by its type only
    (Locust reports one row per distinct message)."""
    if value is None:
        return "absent"
    if type(value) is int and -10 <= value <= 10:
        return str(value)
    return f"a {type(value).__name__}"


def _is_uuid4(text: str) -> bool:
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        return False
    return str(parsed) == text.lower() and parsed.version == 4


def fail_unexpected(response: ResponseContextManager, what: str, expected: int) -> None:
    """Mark ``response`` failed because it is not ``expected``; 429 gets its own message."""
    status = response.status_code
    if status == 429:
        _fail(response, RATE_LIMITED)
    elif status == 0:
        error = getattr(response, "error", None)
        _fail(response, f"{what}: no HTTP answer: {type(error).__name__}: {error}")
    else:
        # Digits masked so that Locust groups the failures ("secret is # bytes ...").
        detail = re.sub(r"\d+", "#", _json_string(response, "detail") or "")[:200]
        _fail(response, f"{what}: expected HTTP {expected}, got {status}: {detail}")


def _authorization() -> dict[str, str] | None:
    """The API key every request sends when SECRET_MANAGER_TOKEN is set, as the command
    line's client does: a server with API keys (the shipped stack) answers 401 otherwise."""
    token = os.environ.get("SECRET_MANAGER_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else None


class VaultUser(FastHttpUser):
    """The secret API as checked calls; FastHttpUser costs the load generator least."""

    abstract = True
    wait_time = constant(0)
    default_headers = _authorization()

    def create_secret(
        self, plaintext: bytes, *, max_reads: int | None = None, name: str = "create"
    ) -> str | None:
        """Store ``plaintext``; its secret_id when acknowledged, else None.

        Only plain creates (``name`` "create") go to the ack file: a secret created to be
        deleted or read up is meant to be gone when the run ends.
        """
        body: dict[str, object] = {"secret": b64(plaintext)}
        if max_reads is not None:
            body["max_reads"] = max_reads
        with self.client.post(CREATE_PATH, json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                fail_unexpected(r, name, 200)
                return None
            secret_id = _json_string(r, "secret_id")
            if secret_id is None or not _is_uuid4(secret_id):
                _fail(r, f"{name}: HTTP 200 without a UUID secret_id")
                return None
            if name == "create":
                ACKS.record(secret_id, plaintext)
            reads_left = _json_field(r, "reads_left")
            if not _same_count(reads_left, max_reads):
                # Absent without max_reads (the answer old clients know), max_reads with it.
                _fail(r, f"{name}: reads_left is {_shape(reads_left)}, not {_shape(max_reads)}")
                return None
            _succeed(r)
            return secret_id

    def fetch_secret(
        self,
        secret_id: str,
        plaintext: bytes,
        *,
        reads_left: int | None = None,
        name: str = "fetch",
    ) -> None:
        """Fetch ``secret_id``: it must hold exactly ``plaintext`` and carry ``reads_left``
        (no such field for a secret without a read limit)."""
        body = {"secret_id": secret_id}
        with self.client.post(FETCH_PATH, json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                fail_unexpected(r, name, 200)
                return
            encoded = _json_string(r, "secret")
            if encoded is None:
                _fail(r, f"{name}: HTTP 200 without a string field 'secret'")
                return
            try:
                fetched = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                _fail(r, f"{name}: 'secret' is not valid base64")
                return
            if fetched != plaintext:
                # Never the bytes (secret material), nor the sizes: Locust reports one row per
                # distinct message, and random sizes would make thousands of rows.
                same = "same length" if len(fetched) == len(plaintext) else "another length"
                _fail(r, f"{name}: a different secret came back ({same})")
                return
            answered = _json_field(r, "reads_left")
            if not _same_count(answered, reads_left):
                _fail(r, f"{name}: reads_left is {_shape(answered)}, not {_shape(reads_left)}")
                return
            _succeed(r)

    def delete_secret(self, secret_id: str, name: str = "delete") -> bool:
        """Delete ``secret_id``: 200 ``{"secret_id": ..., "deleted": true}``; whether it was."""
        body = {"secret_id": secret_id}
        with self.client.post(DELETE_PATH, json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                fail_unexpected(r, name, 200)
                return False
            if _json_string(r, "secret_id") != secret_id or _json_field(r, "deleted") is not True:
                _fail(r, f'{name}: HTTP 200 without its secret_id and "deleted": true')
                return False
            _succeed(r)
            return True

    def expect_gone(self, path: str, secret_id: str, name: str) -> None:
        """``secret_id`` is used up or deleted: 404, told apart from an unknown id by nothing."""
        body = {"secret_id": secret_id}
        with self.client.post(path, json=body, name=name, catch_response=True) as r:
            if r.status_code != 404:
                fail_unexpected(r, name, 404)
            elif _json_string(r, "detail") != UNKNOWN_ID_DETAIL:
                _fail(r, f"{name}: 404 with another detail than an unknown id's")
            else:
                _succeed(r)

    def expect_status(self, path: str, name: str, expected: int, **request: Any) -> None:
        """Send a request that must be refused with exactly ``expected``."""
        with self.client.post(path, name=name, catch_response=True, **request) as r:
            if r.status_code == expected:
                _succeed(r)
            else:
                fail_unexpected(r, name, expected)


class RoundtripUser(VaultUser):
    """Create a random secret, fetch it back and compare the bytes."""

    @tag("roundtrip")
    @task
    def roundtrip(self) -> None:
        plaintext = random_secret()
        secret_id = self.create_secret(plaintext)
        if secret_id is not None:
            self.fetch_secret(secret_id, plaintext)


class CreateBurstUser(VaultUser):
    """Creates only, back to back: ``-u 20 -r 20`` is the "20 concurrent creates" test."""

    @tag("burst")
    @task
    def create(self) -> None:
        self.create_secret(random_secret())


class ReadHeavyUser(VaultUser):
    """About 9 verified fetches per create, from a pool of secrets this user created; now and
    then a secret created apart, deleted, and found gone."""

    def on_start(self) -> None:
        self.pool: list[tuple[str, bytes]] = []
        self.add_to_pool()

    def add_to_pool(self) -> None:
        plaintext = random_secret()
        secret_id = self.create_secret(plaintext)
        if secret_id is None:
            return
        if len(self.pool) < READ_POOL_SIZE:
            self.pool.append((secret_id, plaintext))
        else:
            self.pool[secrets.randbelow(READ_POOL_SIZE)] = (secret_id, plaintext)

    @tag("readheavy")
    @task(1)
    def create(self) -> None:
        self.add_to_pool()

    @tag("readheavy")
    @task(9)
    def fetch(self) -> None:
        if not self.pool:  # every create so far failed
            self.add_to_pool()
            return
        self.fetch_secret(*secrets.choice(self.pool))

    @tag("readheavy")
    @task(1)
    def delete(self) -> None:
        """Create a secret apart from the pool, delete it, then find it gone."""
        secret_id = self.create_secret(random_secret(), name="create (to delete)")
        if secret_id is not None and self.delete_secret(secret_id):
            self.expect_gone(FETCH_PATH, secret_id, "fetch (deleted)")


class OneTimeUser(VaultUser):
    """One-time secrets: create with max_reads 1, fetch it (200), fetch it again (404)."""

    @tag("onetime")
    @task
    def read_once(self) -> None:
        plaintext = random_secret()
        secret_id = self.create_secret(plaintext, max_reads=1, name="create (max_reads 1)")
        if secret_id is None:
            return
        self.fetch_secret(secret_id, plaintext, reads_left=0, name="fetch (max_reads 1)")
        self.expect_gone(FETCH_PATH, secret_id, "fetch (used up)")


class NegativeUser(VaultUser):
    """Requests the API must refuse with exactly 400, 404 or 413, never a 5xx."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        limit = int(getattr(options, "max_secret_bytes", DEFAULT_MAX_SECRET_BYTES))
        self.oversized = os.urandom(limit + 1)
        self.oversized_body = json.dumps({"secret": b64(self.oversized)})

    @tag("negative")
    @task(3)
    def invalid_base64(self) -> None:
        body = {"secret": secrets.choice(INVALID_SECRETS)}
        self.expect_status(CREATE_PATH, "create (invalid base64)", 400, json=body)

    @tag("negative")
    @task(3)
    def unknown_id(self) -> None:
        body = {"secret_id": str(uuid.uuid4())}
        self.expect_status(FETCH_PATH, "fetch (unknown id)", 404, json=body)

    @tag("negative")
    @task(1)
    def invalid_max_reads(self) -> None:
        body = {"secret": b64(b"never stored"), "max_reads": secrets.choice(INVALID_MAX_READS)}
        self.expect_status(CREATE_PATH, "create (invalid max_reads)", 400, json=body)

    @tag("negative")
    @task(1)
    def delete_unknown_id(self) -> None:
        body = {"secret_id": str(uuid.uuid4())}
        self.expect_status(DELETE_PATH, "delete (unknown id)", 404, json=body)

    @tag("negative")
    @task(1)
    def malformed_id(self) -> None:
        body = {"secret_id": secrets.choice(MALFORMED_IDS)}
        self.expect_status(FETCH_PATH, "fetch (malformed id)", 400, json=body)

    @tag("negative")
    @task(1)
    def oversized_secret(self) -> None:
        name = "create (oversized)"
        headers = {"Content-Type": "application/json"}
        with self.client.post(
            CREATE_PATH, data=self.oversized_body, headers=headers, name=name, catch_response=True
        ) as r:
            if r.status_code == 413:
                _succeed(r)
                return
            secret_id = _json_string(r, "secret_id")
            if r.status_code == 200 and secret_id is not None:
                # Wrong, but acknowledged all the same: the loss check must know of it.
                ACKS.record(secret_id, self.oversized)
            fail_unexpected(r, name, 413)

    @tag("negative")
    @task(2)
    def malformed_json(self) -> None:
        headers = {"Content-Type": "application/json"}
        body = secrets.choice(MALFORMED_BODIES)
        path, name = secrets.choice(
            ((CREATE_PATH, "create (malformed JSON)"), (FETCH_PATH, "fetch (malformed JSON)"))
        )
        self.expect_status(path, name, 400, data=body, headers=headers)


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def add_arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--max-p95-ms",
        type=float,
        default=0.0,
        help="Exit with code 1 when the p95 of all requests exceeds this many ms (0: no limit)",
    )
    parser.add_argument(
        "--max-secret-bytes",
        type=int,
        default=DEFAULT_MAX_SECRET_BYTES,
        help="The server's MAX_SECRET_BYTES; NegativeUser sends one byte more, expecting 413",
    )


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def set_exit_code(environment: Environment, **_kwargs: Any) -> None:
    """Exit code 1 when any request failed, a task raised, or the total p95 is over
    --max-p95-ms; else 0."""
    ACKS.close()
    if isinstance(environment.runner, WorkerRunner):
        return  # the master judges the whole run
    total = environment.stats.total
    limit = float(getattr(environment.parsed_options, "max_p95_ms", 0.0) or 0.0)
    p95 = total.get_response_time_percentile(0.95)
    reasons = []
    if total.num_failures:
        reasons.append(f"{total.num_failures} of {total.num_requests} requests failed")
    runner = environment.runner
    crashes = 0
    if runner is not None:
        crashes = sum(int(entry["count"]) for entry in runner.exceptions.values())
    if crashes:
        # Locust would exit 1 for these on its own; setting the code here overrides that.
        reasons.append(f"{crashes} exceptions in the users' tasks (see the report above)")
    if limit > 0 and p95 > limit:
        reasons.append(f"p95 response time {p95} ms is over --max-p95-ms {limit:g}")
    if reasons:
        log.error("load test failed: %s", "; ".join(reasons))
        environment.process_exit_code = 1
    else:
        log.info("load test passed: %d requests, none failed, p95 %s ms", total.num_requests, p95)
        environment.process_exit_code = 0
