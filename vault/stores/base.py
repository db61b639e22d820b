"""The small storage interface the routes depend on, and the record it stores.

A store only ever sees sealed records: nonce, ciphertext and key id, never plaintext.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import anyio
import anyio.to_thread

from observability.audit import AuditRecord
from observability.metrics import observe_store_operation
from observability.tracing import store_span

T = TypeVar("T")


@dataclass(frozen=True)
class SealedSecret:
    """One encrypted secret as it is stored."""

    secret_id: str
    key_id: str
    nonce: bytes
    ciphertext: bytes


class StoreUnavailable(Exception):
    """The store did not answer in time or refused the connection; the caller may retry."""


class SecretStore(Protocol):
    """What the routes need from a store. Every method runs its I/O off the event loop."""

    async def open(self) -> None:
        """Prepare resources (thread limiter, schema). Must not fail if the store is down."""

    async def close(self) -> None:
        """Release connections."""

    async def insert(self, record: SealedSecret) -> None:
        """Durably store a new record; return only once it would survive a crash."""

    async def get(self, secret_id: str) -> SealedSecret | None:
        """The record with this id, or None."""

    async def ping(self) -> None:
        """Return if the store answers, else raise StoreUnavailable."""

    async def insert_audit(self, records: Sequence[AuditRecord]) -> None:
        """Durably store a batch of audit records in one write."""

    async def apply_audit_retention(self, ttl_days: int) -> None:
        """Keep audit records ``ttl_days`` days (0: forever); called at start and hourly."""


async def run_off_loop(
    func: Callable[..., T],
    *args: object,
    limiter: anyio.CapacityLimiter,
    timeout: float,
    operation: str,
    system: str,
) -> T:
    """Run blocking store I/O in a worker thread, giving up after ``timeout`` seconds.

    The caller is answered in bounded time even when the database hangs: the thread is
    abandoned (its own driver timeouts end it) and the request gets StoreUnavailable.
    """
    started = time.perf_counter()
    try:
        # The thread inherits this context, so driver spans nest under the store span.
        with store_span(operation, system=system), anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(
                func, *args, limiter=limiter, abandon_on_cancel=True
            )
    except TimeoutError:
        raise StoreUnavailable(f"store did not answer within {timeout:g}s") from None
    finally:
        observe_store_operation(operation, time.perf_counter() - started)
