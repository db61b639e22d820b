"""pymongo's errors mapped onto vault.errors, in one table read top to bottom.

Each rule says, for the errors it covers: whether the call failed as an outage (raised as
StoreUnavailable: the caller gets 503 and may retry) or the database answered about this
call (raised as it is: a refusal of one record, say); whether the database is down (the
breaker opens, and calls are refused at once until a probe finds it back); and what a
write failing with it means for /readyz. No rule reads an error's message text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pymongo.errors import ConnectionFailure, PyMongoError, WriteConcernError

from vault.errors import StoreUnavailable
from vault.stores.health import DISK_FULL, REFUSING_WRITES, UNREACHABLE

OUT_OF_DISK_SPACE = 14031  # the server's own error code when its disk is full


@dataclass(frozen=True)
class Rule:
    """What errors that ``matches`` accepts mean."""

    matches: Callable[[PyMongoError], bool]
    outage: bool  # raised as StoreUnavailable: the caller may retry
    down: bool  # the database did not answer: the next call most likely would not either
    reason: str  # what /readyz says when a write failed with it


RULES = (
    # Written perhaps, but not confirmed: the server answers yet does not take writes.
    Rule(
        lambda e: isinstance(e, WriteConcernError) and bool(e.timeout),
        outage=True,
        down=True,
        reason=REFUSING_WRITES,
    ),
    Rule(
        lambda e: isinstance(e, WriteConcernError), outage=True, down=False, reason=REFUSING_WRITES
    ),
    # Refused, reset, no server selectable, or no answer within the budget.
    Rule(
        lambda e: isinstance(e, ConnectionFailure) or bool(e.timeout),
        outage=True,
        down=True,
        reason=UNREACHABLE,
    ),
    Rule(
        lambda e: getattr(e, "code", None) == OUT_OF_DISK_SPACE,
        outage=False,
        down=False,
        reason=DISK_FULL,
    ),
)
# Anything else: the database answered, if only to refuse; it is up.
ANSWERED = Rule(lambda e: True, outage=False, down=False, reason=REFUSING_WRITES)


def rule_for(exc: PyMongoError) -> Rule:
    """The first rule that covers ``exc``."""
    return next((rule for rule in RULES if rule.matches(exc)), ANSWERED)


def is_unavailable(exc: PyMongoError) -> bool:
    """Whether ``exc`` means the database is not reachable or not writable right now."""
    return rule_for(exc).outage


def is_down(exc: PyMongoError) -> bool:
    """Whether ``exc`` means the database did not answer (the breaker opens)."""
    return rule_for(exc).down


def mapped_unavailable(exc: PyMongoError) -> StoreUnavailable:
    """An outage as StoreUnavailable, with its reason for /readyz."""
    return StoreUnavailable(type(exc).__name__, reason=rule_for(exc).reason)


def readiness_reason(exc: Exception) -> str:
    """What /readyz says when a write failed with ``exc`` that carries no reason of its own
    (no answer within its budget, the breaker refused it, or the database's refusal)."""
    if isinstance(exc, StoreUnavailable):
        return UNREACHABLE
    if isinstance(exc, PyMongoError) and not rule_for(exc).outage:
        return rule_for(exc).reason
    return REFUSING_WRITES
