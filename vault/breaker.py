"""A small circuit breaker for a dependency that may be down (a database, a shared counter).

Closed, every call goes through. The first failure opens it: calls are then refused at once
(the caller answers without waiting for a dependency known to be down), except one probe at
a time, let through once ``retry_after`` seconds have passed since the last failure. The
first success, of the probe or of a call that was already running, closes it again.

It lives on one event loop and takes no lock: nothing awaits between a decision and the
state change it makes. It sits here, beside the stores and below the middleware, so that
both the store calls and the rate limiter's shared counter use this one mechanism.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class Call(enum.Enum):
    """The ticket ``try_call`` hands out; given back to report how the call ended."""

    REGULAR = "regular"  # the breaker was closed
    PROBE = "probe"  # the one call trying a dependency known to be down


class CircuitBreaker:
    """See the module docstring. The hooks (metrics, logs) run on each state change and on
    each refused call; they must not raise."""

    def __init__(
        self,
        *,
        retry_after: float,
        on_open: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        if not retry_after >= 0:
            raise ValueError("retry_after must be a number of seconds, at least 0")
        self.retry_after = retry_after
        self._on_open = on_open
        self._on_close = on_close
        self._on_refused = on_refused
        self._open = False
        self._retry_at = 0.0
        self._probing = False

    @property
    def is_open(self) -> bool:
        """Whether the dependency is known down (the last verdict was a failure)."""
        return self._open

    def _refusing(self) -> bool:
        # Closed: no clock is read, so the healthy path costs one attribute test.
        return self._open and (self._probing or time.monotonic() < self._retry_at)

    def refuses_now(self) -> bool:
        """True when a call made now would be refused; claims nothing. For a caller that
        queues work (a batcher) and should not queue behind a dependency known down."""
        if self._refusing():
            if self._on_refused is not None:
                self._on_refused()
            return True
        return False

    def try_call(self) -> Call | None:
        """A ticket to call the dependency now, or None: it is known down, answer at once.
        Every ticket must be given back to exactly one of succeeded, failed or abandoned."""
        if not self._open:
            return Call.REGULAR
        if self.refuses_now():
            return None
        self._probing = True
        return Call.PROBE

    def succeeded(self, call: Call) -> None:
        """The dependency answered: close the breaker."""
        if call is Call.PROBE:
            self._probing = False
        if self._open:
            self._open = False
            if self._on_close is not None:
                self._on_close()

    def failed(self, call: Call) -> None:
        """The dependency is down: open the breaker (again) for ``retry_after`` seconds."""
        if call is Call.PROBE:
            self._probing = False
        self._retry_at = time.monotonic() + self.retry_after
        if not self._open:
            self._open = True
            if self._on_open is not None:
                self._on_open()

    def abandoned(self, call: Call) -> None:
        """The call ended without telling either way (cancelled, or an unrelated error):
        free the probe's place so that the next request may try."""
        if call is Call.PROBE:
            self._probing = False
