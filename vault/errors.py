"""Every error the service raises on purpose, in one hierarchy with structured fields.

```text
VaultError
├── ConfigError           a setting is missing or malformed: serve and the commands stop
│                         with one line naming the variable (exit status 2)
├── ClientError           what vault.client raises: an answer's status, the server's detail
│                         and request id (BadRequest, NotFound, Unavailable, ...; its
│                         ConfigurationError is a ConfigError too)
├── InvalidInput          a value is malformed; the message says what is expected
│   ├── InvalidValue      a secret or secret id in a request (400)
│   ├── MalformedKey      a master key
│   └── InvalidAPIKeys    API keys or the metrics token (never quoting the text)
├── UnreadableRecord      a stored record no configured key opens: that request alone fails
│   ├── UnknownKey        sealed by a key that is not configured
│   ├── DecryptionFailed  tampered, swapped or corrupted
│   └── CorruptRecord     a field missing or of the wrong type (edited outside the service)
├── StoreUnavailable      the store did not answer or refused writes: 503, retry later;
│   │                     ``reason`` says what it means for /readyz
│   ├── StoreKnownDown    refused without trying: the breaker knows the store is down
│   └── NotReady          /readyz's refusal, always with its reason
└── TransferRefused       an export file cannot be imported, or a store cannot be
                          exported (records keyed by their id); nothing was written
```

Each store maps its driver's errors onto these in one table of its own
(``vault/stores/mongo/errors.py``, ``vault/stores/sqlite/errors.py``); nothing decides by
matching an error's message text. Pure domain: the standard library only.
"""

from __future__ import annotations


class VaultError(Exception):
    """An error the service raises on purpose (not a bug of ours)."""


class ConfigError(VaultError):
    """A setting is missing or malformed; the message names the variable and the fix."""


class InvalidInput(VaultError, ValueError):
    """A value is malformed; the message says what is expected, never the value itself
    when it may be secret."""


class InvalidValue(InvalidInput):
    """A secret or secret id in a request is malformed; the message says what is expected."""


class MalformedKey(InvalidInput):
    """A configured key is neither base64 of 32 bytes nor a raw 32-character string."""


class InvalidAPIKeys(InvalidInput):
    """API keys or the metrics token are malformed. The message names the variable and the
    line, and never quotes the text, which may hold a token."""


class UnreadableRecord(VaultError):
    """A stored record no configured key can open: its own request fails (500), the others
    read in the same call are unaffected."""


class UnknownKey(UnreadableRecord):
    """A record names a key id this keyring does not hold."""


class DecryptionFailed(UnreadableRecord):
    """A record failed authentication: tampered, swapped or corrupted."""


class CorruptRecord(UnreadableRecord):
    """A stored record lacks a field or holds one of the wrong type (edited outside the
    service)."""


class StoreUnavailable(VaultError):
    """The store did not answer in time or refused the connection; the caller may retry.

    ``reason``, set where a driver's error is mapped when the store can tell, is what a
    write failing with it means for /readyz (one of ``vault.stores.health.REASONS``);
    None when the store cannot tell (a call that ran out of its budget, say).
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason

    @classmethod
    def after(cls, timeout: float | None) -> StoreUnavailable:
        """The error for a store call, or a wait for one, that ran out of its budget."""
        return cls(f"store did not answer within {timeout:g}s")


class StoreKnownDown(StoreUnavailable):
    """Refused without trying: the store's circuit breaker knows it is down. The breaker
    logs the outage once (opened, answering again); each refusal is only counted."""


class NotReady(StoreUnavailable):
    """What a store's ping raises when the replica is not ready: ``reason``, one of
    ``vault.stores.health.REASONS``, says why (writes fail, or the store did not answer)."""

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason, reason=reason)


class TransferRefused(VaultError):
    """The file cannot be imported (damaged, truncated, foreign, newer), or the store cannot
    be exported (it holds records keyed by their secret id); nothing was written."""
