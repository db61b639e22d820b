"""vault/breaker.py: the circuit breaker shared by the store calls and the rate limiter."""

from __future__ import annotations

import time

import pytest

from vault.breaker import Call, CircuitBreaker


class Recorder:
    """The hooks a breaker calls, counted."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.refused = 0

    def breaker(self, retry_after: float) -> CircuitBreaker:
        return CircuitBreaker(
            retry_after=retry_after,
            on_open=lambda: setattr(self, "opened", self.opened + 1),
            on_close=lambda: setattr(self, "closed", self.closed + 1),
            on_refused=lambda: setattr(self, "refused", self.refused + 1),
        )


def test_a_closed_breaker_lets_every_call_through() -> None:
    hooks = Recorder()
    breaker = hooks.breaker(0.2)
    calls = [breaker.try_call() for _ in range(5)]
    assert calls == [Call.REGULAR] * 5
    for call in calls:
        breaker.succeeded(call)
    assert not breaker.is_open and not breaker.refuses_now()
    assert (hooks.opened, hooks.closed, hooks.refused) == (0, 0, 0)


def test_a_failure_opens_it_and_calls_are_refused_until_the_retry_time() -> None:
    hooks = Recorder()
    breaker = hooks.breaker(0.2)
    call = breaker.try_call()
    assert call is Call.REGULAR
    breaker.failed(call)

    assert breaker.is_open
    assert [breaker.try_call() for _ in range(3)] == [None] * 3
    assert breaker.refuses_now()
    assert (hooks.opened, hooks.refused) == (1, 4)

    time.sleep(0.25)
    assert not breaker.refuses_now()  # asks without claiming the probe
    assert breaker.try_call() is Call.PROBE


def test_one_probe_at_a_time_and_its_failure_waits_out_another_interval() -> None:
    breaker = CircuitBreaker(retry_after=0.2)
    breaker.failed(Call.REGULAR)
    time.sleep(0.25)
    probe = breaker.try_call()
    assert probe is Call.PROBE
    assert breaker.try_call() is None  # while it runs, however long, the others are refused
    assert breaker.refuses_now()

    breaker.failed(probe)
    assert breaker.is_open
    assert breaker.try_call() is None  # the interval starts again from this failure
    time.sleep(0.25)
    assert breaker.try_call() is Call.PROBE


def test_the_first_success_closes_it() -> None:
    hooks = Recorder()
    breaker = hooks.breaker(0.2)
    breaker.failed(Call.REGULAR)
    time.sleep(0.25)
    probe = breaker.try_call()
    assert probe is not None
    breaker.succeeded(probe)

    assert not breaker.is_open
    assert [breaker.try_call() for _ in range(3)] == [Call.REGULAR] * 3
    assert (hooks.opened, hooks.closed) == (1, 1)


def test_a_call_started_before_the_outage_that_succeeds_closes_it_too() -> None:
    breaker = CircuitBreaker(retry_after=10)
    early = breaker.try_call()
    late = breaker.try_call()
    assert early is Call.REGULAR and late is Call.REGULAR
    breaker.failed(early)
    assert breaker.try_call() is None
    breaker.succeeded(late)  # the dependency answered after all
    assert breaker.try_call() is Call.REGULAR


def test_an_abandoned_probe_frees_its_place_without_a_verdict() -> None:
    hooks = Recorder()
    breaker = hooks.breaker(0)
    breaker.failed(Call.REGULAR)
    probe = breaker.try_call()
    assert probe is Call.PROBE
    assert breaker.try_call() is None
    breaker.abandoned(probe)  # its request was cancelled: no news about the dependency

    assert breaker.is_open
    assert breaker.try_call() is Call.PROBE  # the next request may try at once
    assert (hooks.opened, hooks.closed) == (1, 0)


def test_a_regular_call_failing_does_not_free_the_probes_place() -> None:
    breaker = CircuitBreaker(retry_after=0)
    early = breaker.try_call()
    assert early is Call.REGULAR
    breaker.failed(Call.REGULAR)
    probe = breaker.try_call()
    assert probe is Call.PROBE
    breaker.failed(early)  # a call from before the outage ends late
    assert breaker.try_call() is None  # the probe still runs: no second one


def test_retry_after_must_be_a_number_of_seconds() -> None:
    with pytest.raises(ValueError, match="retry_after"):
        CircuitBreaker(retry_after=-1)
    with pytest.raises(ValueError, match="retry_after"):
        CircuitBreaker(retry_after=float("nan"))
