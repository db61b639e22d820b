"""A real ``serve`` under a small load while its nx-27017 is killed and restarted, or frozen
(SIGSTOP) and thawed: once the database is known down the 503s come at once, service
resumes promptly when it answers again, every 503 is audited and no acknowledged secret is
lost. The measured numbers are printed (``pytest -s``) for the issue's closing note."""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx2 as httpx
import pymongo
import pytest

from tests.conftest import MongoWireServer, ServerProcess, b64, wait_until
from vault.settings import DEFAULT_STORE_TIMEOUT_SECONDS

THREADS = 4
PAUSE_SECONDS = 0.02  # between one thread's requests: a bounded load, not a flood
# The budget every store call gets by default, which docs/operations.md reports measured.
STORE_TIMEOUT_SECONDS = DEFAULT_STORE_TIMEOUT_SECONDS
# The target is 100 ms at p99; asserted with room for a loaded CI machine, still far
# below the STORE_TIMEOUT_SECONDS + 1 s every 503 took before.
FAST_503_BOUND = 0.5
RECOVERY_BOUND = 3.0  # the target is 1 s; measured and printed


@dataclass(frozen=True)
class Answer:
    started: float
    ended: float
    status: int
    request_id: str
    retry_after: str | None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """Threads sending creates and fetches in turn, every answer kept with its times."""

    url: str
    secret_id: str
    answers: list[Answer] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=dict)  # secret id → secret, acknowledged
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(THREADS):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                secret = f"load-{n}-{i}"
                create = i % 2 == 0
                started = time.monotonic()
                try:
                    if create:
                        response = client.post(
                            "/vault/secret/create", json={"secret": b64(secret.encode())}
                        )
                    else:
                        response = client.post(
                            "/vault/secret/fetch", json={"secret_id": self.secret_id}
                        )
                except httpx.HTTPError as exc:  # the service must answer, outage or not
                    with self._lock:
                        self.errors.append(type(exc).__name__)
                    continue
                answer = Answer(
                    started,
                    time.monotonic(),
                    response.status_code,
                    response.headers.get("x-request-id", ""),
                    response.headers.get("retry-after"),
                )
                with self._lock:
                    self.answers.append(answer)
                    if create and response.status_code == 200:
                        self.created[response.json()["secret_id"]] = secret
                time.sleep(PAUSE_SECONDS)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


@pytest.fixture
def loaded_server(
    own_mongo: MongoWireServer,
    start_server: Callable[..., ServerProcess],
    master_key: str,
) -> Iterator[tuple[ServerProcess, Load]]:
    server = start_server(
        {
            "MASTER_KEY": master_key,
            "MONGO_URI": own_mongo.uri,
            "MONGO_DB": "breaker",
            "STORE_TIMEOUT_SECONDS": str(STORE_TIMEOUT_SECONDS),
            "RATE_LIMIT": "off",  # one client address sends all of the load
        }
    )
    first = httpx.post(server.url + "/vault/secret/create", json={"secret": b64(b"kept")})
    assert first.status_code == 200
    load = Load(server.url, first.json()["secret_id"])
    load.created[load.secret_id] = "kept"
    load.start()
    try:
        yield server, load
    finally:
        load.stop()


def after(answers: list[Answer], moment: float) -> list[Answer]:
    return [a for a in answers if a.started >= moment]


def wait_for_answers(load: Load, predicate: Callable[[list[Answer]], bool], what: str) -> None:
    wait_until(lambda: predicate(load.snapshot()), 30, what)


def breaker_metrics(url: str) -> tuple[float, float, float]:
    """The secret store's breaker as /metrics shows it: open (0 or 1), openings, refusals."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for name in ("vault_store_breaker_open", "vault_store_breaker_opened_total",
                 "vault_store_short_circuited_total"):  # fmt: skip
        prefix = f'{name}{{store="secrets"}} '
        line = next(line for line in text.splitlines() if line.startswith(prefix))
        values[name] = float(line.removeprefix(prefix))
    return (
        values["vault_store_breaker_open"],
        values["vault_store_breaker_opened_total"],
        values["vault_store_short_circuited_total"],
    )


def outage(
    url: str, load: Load, begin: Callable[[], None], end: Callable[[], None]
) -> dict[str, float]:
    """Run the load through an outage; return what was measured (seconds)."""
    assert breaker_metrics(url) == (0, 0, 0)
    wait_for_answers(load, lambda a: sum(x.status == 200 for x in a) >= 20, "the load to run")
    began = time.monotonic()
    begin()
    wait_for_answers(load, lambda a: any(x.status == 503 for x in after(a, began)), "the first 503")
    first_503 = min(x.ended for x in after(load.snapshot(), began) if x.status == 503)
    time.sleep(2.0)  # the breaker is open: these answers are the ones that must be fast
    is_open, opened, refused = breaker_metrics(url)
    assert is_open == 1 and opened >= 1 and refused >= 20

    end_started = time.monotonic()
    end()
    back = time.monotonic()  # the database answers ping again
    wait_for_answers(
        load, lambda a: any(x.status == 200 for x in after(a, back)), "a request to succeed"
    )
    first_success = min(x.ended for x in load.snapshot() if x.status == 200 and x.ended >= back)
    time.sleep(1.0)
    answers = load.snapshot()
    assert breaker_metrics(url)[0] == 0

    # Every request sent between the first 503 and the end of the fault; one of them at a
    # time is the probe, which waits for the database (and may end after its return).
    fast = [x for x in answers if first_503 <= x.started < end_started]
    assert len(fast) >= 20, "too few requests during the outage to measure"
    during = [x for x in fast if x.ended <= end_started]
    assert {x.status for x in during} == {503}
    assert {x.retry_after for x in during} == {"5"}
    settled = after(answers, first_success + 0.5)
    assert settled and {x.status for x in settled} == {200}  # closed: no 503 after the return
    assert load.errors == []
    return {
        "first 503 after the fault": first_503 - began,
        "requests after the first 503": len(fast),
        "p50 latency": statistics.median(x.seconds for x in fast),
        "p99 latency": p99([x.seconds for x in fast]),
        "max latency": max(x.seconds for x in fast),
        "slower than 100 ms": sum(x.seconds > 0.1 for x in fast),
        "recovery after the database answers": first_success - back,
        "recovery after the fault ended": first_success - end_started,
    }


def check_nothing_lost(server: ServerProcess, own_mongo: MongoWireServer, load: Load) -> None:
    """Every acknowledged secret is there; every 503 was audited, stored or spilled to the log."""
    load.stop()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for secret_id, secret in load.created.items():
            fetched = client.post("/vault/secret/fetch", json={"secret_id": secret_id})
            assert fetched.status_code == 200
            assert fetched.json() == {"secret": b64(secret.encode())}
    refused = {x.request_id for x in load.snapshot() if x.status == 503}
    with pymongo.MongoClient(own_mongo.uri) as mongo:
        stored = {doc["request_id"] for doc in mongo["breaker"]["audit"].find({"status": 503})}
    log = server.output()
    spilled = {request_id for request_id in refused - stored if request_id in log}
    assert refused and refused <= stored | spilled
    # The outage is in the log once (opened, answering again), not once per refusal.
    warned = log.count('"message": "store unavailable')
    assert log.count("is down; answering 503 at once") >= 1
    assert warned < len(refused) / 4, f"{warned} warnings for {len(refused)} refusals"


def report(title: str, measured: dict[str, float]) -> None:
    print(f"\n{title}")
    for name, value in measured.items():
        print(
            f"  {name}: {value * 1000:.1f} ms" if isinstance(value, float) else f"  {name}: {value}"
        )


def test_a_killed_database_is_answered_503_at_once_and_service_resumes_on_its_restart(
    loaded_server: tuple[ServerProcess, Load], own_mongo: MongoWireServer
) -> None:
    server, load = loaded_server
    measured = outage(server.url, load, lambda: own_mongo.stop(signal.SIGKILL), own_mongo.start)
    report("nx-27017 killed (connections refused), then restarted", measured)
    assert measured["p99 latency"] < FAST_503_BOUND
    assert measured["recovery after the database answers"] < RECOVERY_BOUND
    check_nothing_lost(server, own_mongo, load)


def test_a_frozen_database_is_answered_503_at_once_after_the_first_timeout(
    loaded_server: tuple[ServerProcess, Load], own_mongo: MongoWireServer
) -> None:
    server, load = loaded_server
    measured = outage(server.url, load, own_mongo.pause, own_mongo.resume)
    report("nx-27017 frozen (SIGSTOP), then thawed (SIGCONT)", measured)
    # The first 503s wait out the store's budget: a frozen database is only known to be
    # down once a call has timed out.
    assert measured["first 503 after the fault"] > STORE_TIMEOUT_SECONDS - 1
    assert measured["p99 latency"] < FAST_503_BOUND
    assert measured["recovery after the fault ended"] < RECOVERY_BOUND
    check_nothing_lost(server, own_mongo, load)
