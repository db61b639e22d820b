"""middleware/ratelimit.py on a tiny app that counts the requests that reach it.

Limits use hour and day periods so no test runs across a window boundary by accident.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import ip_network

import httpx2 as httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.clientip import ClientIPMiddleware
from middleware.context import request_context
from middleware.ratelimit import PER_API_KEY, Counter, MemoryCounter, RateLimitMiddleware
from vault.breaker import CircuitBreaker
from vault.errors import StoreUnavailable

CLIENT = ("203.0.113.7", 50000)


@dataclass
class Limited:
    """A rate-limited app and what happened behind the limiter."""

    app: Starlette
    reached: list[str]
    limited: list[int]

    def client(self, peer: tuple[str, int] = CLIENT) -> TestClient:
        return TestClient(self.app, client=peer)


@pytest.fixture
def make_limited() -> Callable[..., Limited]:
    """``make_limited(limits, counter=MemoryCounter(), trusted=())`` → a Limited app."""

    def make(
        limits: tuple[tuple[int, int], ...],
        counter: Counter | None = None,
        trusted: tuple[str, ...] = (),
        retry_counter_after: float = 5.0,
    ) -> Limited:
        reached: list[str] = []
        limited: list[int] = []

        async def handle(request: Request) -> Response:
            reached.append(request.url.path)
            return PlainTextResponse("ok")

        app = Starlette(
            routes=[Route("/", handle), Route("/healthz", handle), Route("/other", handle)],
            middleware=[
                Middleware(ClientIPMiddleware, trusted_proxies=[ip_network(t) for t in trusted]),
                Middleware(
                    RateLimitMiddleware,
                    limits=limits,
                    counter=counter or MemoryCounter(),
                    on_limited=lambda: limited.append(1),
                    breaker=CircuitBreaker(retry_after=retry_counter_after),
                ),
            ],
        )
        return Limited(app, reached, limited)

    return make


def window_end(period: int) -> int:
    """Whole seconds from now until the current window of ``period`` ends."""
    return math.ceil(period - time.time() % period)


def rate_headers(response: httpx.Response) -> tuple[str | None, str | None, str | None]:
    h = response.headers
    return h.get("ratelimit-limit"), h.get("ratelimit-remaining"), h.get("ratelimit-reset")


def test_requests_under_the_limit_pass_and_count_down(make_limited: Callable[..., Limited]) -> None:
    limited = make_limited(((3, 3600),))
    client = limited.client()
    before = window_end(3600)
    responses = [client.get("/") for _ in range(3)]
    after = window_end(3600)

    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.text for r in responses] == ["ok", "ok", "ok"]
    assert [rate_headers(r)[:2] for r in responses] == [("3", "2"), ("3", "1"), ("3", "0")]
    for response in responses:
        assert after <= int(response.headers["ratelimit-reset"]) <= before
    assert limited.limited == []


def test_request_over_the_limit_is_refused_before_the_app(
    make_limited: Callable[..., Limited],
) -> None:
    limited = make_limited(((3, 3600),))
    client = limited.client()
    for _ in range(3):
        client.get("/")
    before = window_end(3600)
    refused = client.get("/")
    after = window_end(3600)

    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/json"
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= after <= retry_after <= before
    assert rate_headers(refused) == ("3", "0", str(retry_after))
    assert refused.json() == {
        "detail": "rate limit exceeded: at most 3 requests per hour from one client; "
        f"retry after {retry_after} s"
    }
    assert limited.reached == ["/", "/", "/"]
    assert limited.limited == [1]
    assert client.get("/").status_code == 429
    assert limited.reached == ["/", "/", "/"]
    assert limited.limited == [1, 1]


def test_the_longer_limit_trips_after_the_shorter_allowed_it(
    make_limited: Callable[..., Limited],
) -> None:
    limited = make_limited(((100, 3600), (2, 86400)))
    client = limited.client()
    first, second, third = (client.get("/") for _ in range(3))
    # The day limit is the nearer to running out, so its numbers are the ones shown.
    assert rate_headers(first)[:2] == ("2", "1")
    assert rate_headers(second)[:2] == ("2", "0")
    assert third.status_code == 429
    assert "at most 2 requests per day" in third.json()["detail"]
    assert rate_headers(third)[:2] == ("2", "0")
    assert len(limited.reached) == 2


def test_equally_near_limits_show_the_one_that_resets_last(
    make_limited: Callable[..., Limited],
) -> None:
    limited = make_limited(((5, 3600), (5, 86400)))
    before = window_end(86400)
    response = limited.client().get("/")
    after = window_end(86400)
    assert rate_headers(response)[:2] == ("5", "4")
    assert after <= int(response.headers["ratelimit-reset"]) <= before


def test_when_several_limits_are_exceeded_retry_after_is_the_longest_wait(
    make_limited: Callable[..., Limited],
) -> None:
    limited = make_limited(((1, 3600), (1, 86400)))
    client = limited.client()
    client.get("/")
    before = window_end(86400)
    refused = client.get("/")
    after = window_end(86400)
    assert refused.status_code == 429
    assert after <= int(refused.headers["retry-after"]) <= before
    assert "at most 1 request per day" in refused.json()["detail"]


def test_exempt_paths_are_never_limited_nor_counted(make_limited: Callable[..., Limited]) -> None:
    limited = make_limited(((1, 3600),))
    client = limited.client()
    probes = [client.get("/healthz") for _ in range(5)]
    assert [p.status_code for p in probes] == [200] * 5
    assert all(rate_headers(p) == (None, None, None) for p in probes)
    first = client.get("/")
    assert (first.status_code, rate_headers(first)[1]) == (200, "0")
    assert client.get("/other").status_code == 429
    assert client.get("/healthz").status_code == 200


def test_each_client_address_has_a_limit_of_its_own(make_limited: Callable[..., Limited]) -> None:
    limited = make_limited(((1, 3600),))
    one, other = limited.client(("198.51.100.1", 1)), limited.client(("198.51.100.2", 1))
    assert one.get("/").status_code == 200
    assert one.get("/").status_code == 429
    assert other.get("/").status_code == 200
    assert one.get("/").status_code == 429


def test_clients_behind_a_trusted_proxy_are_told_apart(
    make_limited: Callable[..., Limited],
) -> None:
    limited = make_limited(((1, 3600),), trusted=("10.0.0.0/8",))
    proxy = limited.client(("10.0.0.5", 1))
    assert proxy.get("/", headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 200
    assert proxy.get("/", headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 429
    assert proxy.get("/", headers={"X-Forwarded-For": "198.51.100.2"}).status_code == 200
    # Claiming to be someone else in front of the real address does not reset the count.
    spoofed = {"X-Forwarded-For": "192.0.2.99, 198.51.100.1"}
    assert proxy.get("/", headers=spoofed).status_code == 429


class DownCounter:
    """A counter whose database is unreachable: every increment fails."""

    def __init__(self) -> None:
        self.calls = 0

    async def increment(self, key: str, expires_at: float) -> int:
        self.calls += 1
        raise StoreUnavailable(f"cannot count {key}")

    async def increment_many(self, keys: Sequence[tuple[str, float]]) -> list[int]:
        return [await self.increment(key, expires_at) for key, expires_at in keys]


@pytest.fixture
def ratelimit_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING, logger="secret_manager.ratelimit")
    yield caplog


def test_counter_outage_lets_requests_through_with_one_warning(
    make_limited: Callable[..., Limited], ratelimit_log: pytest.LogCaptureFixture
) -> None:
    counter = DownCounter()
    limited = make_limited(((1, 3600),), counter=counter)
    client = limited.client()
    responses = [client.get("/") for _ in range(5)]

    assert [r.status_code for r in responses] == [200] * 5
    assert all(rate_headers(r) == (None, None, None) for r in responses)
    assert len(limited.reached) == 5 and limited.limited == []
    assert counter.calls == 1  # the others skip the counter that just failed
    warnings = [r for r in ratelimit_log.records if r.name == "secret_manager.ratelimit"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "StoreUnavailable" in warnings[0].getMessage()
    assert CLIENT[0] not in ratelimit_log.text


def test_a_counter_that_failed_is_skipped_for_a_while_then_tried_again(
    make_limited: Callable[..., Limited],
) -> None:
    # Each call to a database that is down costs its timeout (2 s for the MongoDB counter):
    # every request paid it while the counter store was away.
    counter = SwitchableCounter()
    limited = make_limited(((1, 3600),), counter=counter, retry_counter_after=0.3)
    client = limited.client()
    assert [client.get("/").status_code for _ in range(4)] == [200] * 4
    assert counter.calls == 1
    time.sleep(0.35)
    assert [client.get("/").status_code for _ in range(3)] == [200] * 3
    assert counter.calls == 2  # one request tried it again; it failed, so skipped again

    counter.down = False  # back: the next try succeeds and the limit holds again
    time.sleep(0.35)
    assert [client.get("/").status_code for _ in range(3)] == [200, 429, 429]
    assert counter.calls == 5


class SwitchableCounter:
    """A memory counter behind a database that can be down (every call fails) or up."""

    def __init__(self) -> None:
        self.inner = MemoryCounter()
        self.down = True
        self.calls = 0

    async def increment(self, key: str, expires_at: float) -> int:
        (count,) = await self.increment_many([(key, expires_at)])
        return count

    async def increment_many(self, keys: Sequence[tuple[str, float]]) -> list[int]:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("cannot count")
        return await self.inner.increment_many(keys)


@pytest.mark.parametrize(
    ("limits", "complaint"),
    [
        ((), "at least one"),
        (((0, 60),), "positive whole numbers"),
        (((10, 0),), "positive whole numbers"),
        (((10, -60),), "positive whole numbers"),
        (((1.5, 60),), "positive whole numbers"),
        (((10,),), "positive whole numbers"),
        (((10, 60), (20, 60)), "share a period"),
    ],
)
def test_constructor_refuses_limits_that_make_no_sense(
    limits: tuple[tuple[int, int], ...], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        RateLimitMiddleware(PlainTextResponse("ok"), limits=limits, counter=MemoryCounter())


@pytest.mark.anyio
async def test_memory_counter_counts_each_key_apart() -> None:
    counter = MemoryCounter()
    later = time.time() + 3600
    assert [await counter.increment("a", later) for _ in range(3)] == [1, 2, 3]
    assert await counter.increment("b", later) == 1


@pytest.mark.anyio
async def test_memory_counter_starts_again_once_a_key_expired() -> None:
    counter = MemoryCounter(purge_interval=3600)
    past = time.time() - 1
    assert await counter.increment("a", past) == 1
    assert await counter.increment("a", past) == 1


@pytest.mark.anyio
async def test_memory_counter_purges_expired_keys_and_keeps_live_ones() -> None:
    counter = MemoryCounter(purge_interval=0)
    past, later = time.time() - 1, time.time() + 3600
    for n in range(1000):
        await counter.increment(f"gone-{n}", past)
    for n in range(50):
        await counter.increment(f"live-{n}", later)
    assert len(counter) == 50
    assert await counter.increment("live-7", later) == 2


# Per API key: a second layer inside the API keys, counting in the same Counter.


class LetInAs:
    """Stands in for APIKeyMiddleware: puts the key named by the ``X-Test-Key`` header,
    of the tenant in ``X-Test-Tenant`` (none: the default tenant), in the request context,
    as the API key layer does for a caller it lets in; without it, no key (an open path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = request_context(scope)
        for name, value in scope["headers"]:
            if name == b"x-test-key":
                context.api_key_name = value.decode()
            elif name == b"x-test-tenant":
                context.tenant = value.decode()
        await self.app(scope, receive, send)


class RecordingCounter(MemoryCounter):
    """A memory counter that remembers every key it was asked to count."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    async def increment(self, key: str, expires_at: float) -> int:
        self.keys.append(key)
        return await super().increment(key, expires_at)


@dataclass
class Keyed:
    """An app limited per client address, then per API key in the same counter."""

    app: Starlette
    reached: list[str]
    limited: list[str]

    def get(
        self, key: str | tuple[str, str] | None, peer: tuple[str, int] = CLIENT
    ) -> httpx.Response:
        """A request let in under ``key``: ``name``, ``tenant/name`` or (tenant, name)."""
        headers = {}
        if key is not None:
            if isinstance(key, str):
                tenant, _, name = key.rpartition("/")
            else:
                tenant, name = key
            headers["X-Test-Key"] = name
            if tenant:
                headers["X-Test-Tenant"] = tenant
        return TestClient(self.app, client=peer).get("/", headers=headers)


@pytest.fixture
def make_keyed() -> Callable[..., Keyed]:
    """``make_keyed(per_key, per_client=((1000, 86400),), counter=MemoryCounter())`` → a
    Keyed app whose two layers share the counter and its breaker, as the app's do."""

    def make(
        per_key: tuple[tuple[int, int], ...],
        per_client: tuple[tuple[int, int], ...] = ((1000, 86400),),
        counter: Counter | None = None,
    ) -> Keyed:
        counter = MemoryCounter() if counter is None else counter  # an empty one is falsy
        reached: list[str] = []
        limited: list[str] = []
        breaker = CircuitBreaker(retry_after=5.0)

        async def handle(request: Request) -> Response:
            reached.append(request.headers.get("x-test-key", ""))
            return PlainTextResponse("ok")

        app = Starlette(
            routes=[Route("/", handle)],
            middleware=[
                Middleware(ClientIPMiddleware),
                Middleware(
                    RateLimitMiddleware,
                    limits=per_client,
                    counter=counter,
                    on_limited=lambda: limited.append("client"),
                    breaker=breaker,
                ),
                Middleware(LetInAs),
                Middleware(
                    RateLimitMiddleware,
                    limits=per_key,
                    counter=counter,
                    per=PER_API_KEY,
                    on_limited=lambda: limited.append("key"),
                    breaker=breaker,
                ),
            ],
        )
        return Keyed(app, reached, limited)

    return make


def test_two_keys_behind_one_address_each_have_a_budget_of_their_own(
    make_keyed: Callable[..., Keyed],
) -> None:
    keyed = make_keyed(((2, 3600),))
    assert [keyed.get("noisy").status_code for _ in range(2)] == [200, 200]
    assert [keyed.get("noisy").status_code for _ in range(3)] == [429] * 3
    # The noisy key ran out: the quiet one behind the same address has its whole budget.
    quiet = [keyed.get("quiet") for _ in range(2)]
    assert [r.status_code for r in quiet] == [200, 200]
    assert [rate_headers(r)[:2] for r in quiet] == [("2", "1"), ("2", "0")]
    assert keyed.get("quiet").status_code == 429
    assert keyed.reached == ["noisy", "noisy", "quiet", "quiet"]
    assert keyed.limited == ["key"] * 4


def test_the_same_key_name_in_two_tenants_has_two_budgets(
    make_keyed: Callable[..., Keyed],
) -> None:
    keyed = make_keyed(((1, 3600),))
    assert keyed.get("acme/billing").status_code == 200
    assert keyed.get("acme/billing").status_code == 429
    assert keyed.get("globex/billing").status_code == 200
    assert keyed.get("billing").status_code == 200  # the default tenant's
    assert keyed.get("globex/billing").status_code == 429
    assert keyed.get("billing").status_code == 429


def test_a_tenant_and_a_key_name_are_never_confused_whatever_they_hold(
    make_keyed: Callable[..., Keyed],
) -> None:
    # Joined as they are, tenant "a/b" with key "c" and tenant "a" with key "b/c" would
    # both be "a/b/c": one budget for two keys.
    keyed = make_keyed(((1, 3600),))
    assert keyed.get(("a/b", "c")).status_code == 200
    assert keyed.get(("a", "b/c")).status_code == 200
    assert keyed.get(("a/b", "c")).status_code == 429


def test_a_keys_429_looks_like_the_clients_and_says_whose_budget_ran_out(
    make_keyed: Callable[..., Keyed],
) -> None:
    keyed = make_keyed(((2, 3600),))
    keyed.get("ci")
    keyed.get("ci")
    before = window_end(3600)
    refused = keyed.get("ci")
    after = window_end(3600)

    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/json"
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= after <= retry_after <= before
    # The key's numbers, not the client address's (998 of 1000 left), though that layer
    # is outside and sees the answer last.
    assert rate_headers(refused) == ("2", "0", str(retry_after))
    assert refused.json() == {
        "detail": "rate limit exceeded: at most 2 requests per hour for this API key; "
        f"retry after {retry_after} s"
    }
    assert keyed.limited == ["key"]


def test_the_per_client_limit_still_holds_across_keys(make_keyed: Callable[..., Keyed]) -> None:
    keyed = make_keyed(((1, 86400),), per_client=((3, 3600),))
    assert [keyed.get(key).status_code for key in ("a", "b", "c")] == [200] * 3
    refused = keyed.get("d")
    assert refused.status_code == 429
    assert "at most 3 requests per hour from one client" in refused.json()["detail"]
    assert keyed.limited == ["client"]
    # Refused by the client's limit, before the key's layer: "d" spent none of its budget.
    elsewhere = keyed.get("d", peer=("198.51.100.9", 1))
    assert (elsewhere.status_code, rate_headers(elsewhere)[:2]) == (200, ("1", "0"))


def test_the_answer_shows_whichever_limit_is_nearer_to_running_out(
    make_keyed: Callable[..., Keyed],
) -> None:
    keyed = make_keyed(((2, 86400),), per_client=((4, 3600),))
    assert rate_headers(keyed.get(None))[:2] == ("4", "3")  # no key: the client's alone
    assert rate_headers(keyed.get("a"))[:2] == ("2", "1")  # the key's: 1 left, the client 2
    # As few left of each: the one that resets last, as among one layer's limits.
    assert rate_headers(keyed.get("b"))[:2] == ("2", "1")
    assert rate_headers(keyed.get("c"))[:2] == ("4", "0")  # the client's: 0 left, the key 1


def test_both_limits_count_in_one_counter_under_keys_that_never_meet(
    make_keyed: Callable[..., Keyed],
) -> None:
    counter = RecordingCounter()
    keyed = make_keyed(((5, 3600),), per_client=((5, 3600),), counter=counter)
    keyed.get("acme/ci")
    keyed.get("ci")
    keyed.get(None)  # a path that needs no key is counted per client only
    window = int(time.time() // 3600)
    client_key = f"{CLIENT[0]}:3600:{window}"
    assert counter.keys == [
        client_key,
        f"key:acme/ci:3600:{window}",
        client_key,
        f"key:/ci:3600:{window}",
        client_key,
    ]


def test_a_counter_down_lets_every_key_through_and_is_tried_by_one_layer(
    make_keyed: Callable[..., Keyed],
) -> None:
    counter = DownCounter()
    keyed = make_keyed(((1, 3600),), per_client=((1, 3600),), counter=counter)
    assert [keyed.get("ci").status_code for _ in range(4)] == [200] * 4
    # The layers share the counter's breaker: once the outer one found it down, the inner
    # one skips it too, and no request pays a second timeout.
    assert counter.calls == 1
