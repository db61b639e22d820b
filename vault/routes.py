"""The route table: the secret API, health probes, the OpenAPI document and its docs page.

Handlers validate, seal or open, and talk to the store; errors a caller can cause are raised
as HTTPException with a detail that says what to do, and become ``{"detail": ...}``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio
import swagger_ui_bundle
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from middleware.answers import RETRY_AFTER_SECONDS, error_answer
from middleware.context import RequestContext, request_context
from observability.metrics import ACCESS_DENIED, NOT_READY, SECRETS_DELETED
from vault.crypto import SCRYPT_KDF, Keyring, derive_passphrase_key, lock
from vault.errors import DecryptionFailed, InvalidValue, NotReady, StoreUnavailable
from vault.events import Actor
from vault.keyguard import UnreadableRecords
from vault.lifecycle import Caller, Found, Passphrase, receipt_as_of, receipt_kept, utc_now
from vault.openapi import DOCS_HTML, build_openapi
from vault.records import (
    DEFAULT_TENANT,
    IdempotentCreate,
    Receipt,
    SealedSecret,
    idempotency_key,
    record_key,
)
from vault.settings import DEFAULT_MAX_TTL_SECONDS, MAX_READS
from vault.stores.base import DeleteResult, IdempotentRepeat, SecretStore
from vault.stores.health import DISK_FULL, REFUSING_WRITES, UNREACHABLE
from vault.validation import (
    decode_secret,
    label_text,
    normalize_secret_id,
    passphrase_text,
    reader_names,
)

log = logging.getLogger("secret_manager.routes")

# Both spellings of each path answer directly: a redirect makes many clients drop the body.
OPERATIONS = {
    "/vault/secret/create/": "create",
    "/vault/secret/create": "create",
    "/vault/secret/fetch": "fetch",
    "/vault/secret/fetch/": "fetch",
    "/vault/secret/delete": "delete",
    "/vault/secret/delete/": "delete",
    "/vault/secret/status": "status",
    "/vault/secret/status/": "status",
}
# Unknown, deleted, used up or expired: one answer, so it tells a caller nothing.
NOT_FOUND = "no secret has this secret_id; check the id you were given"
IN_FLIGHT = (
    "a create with this Idempotency-Key is still in progress; retry after the time in "
    "Retry-After to get its answer"
)
KEY_REUSED = (
    "this Idempotency-Key was already used with a different request body; send a new key "
    "for a new secret, or the same body to get the first answer again"
)
# Printable ASCII, 1 to 255 characters (the header as the draft standard describes it).
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
LOCKED = 'this secret is protected by a passphrase: send it as "passphrase" in the fetch body'
# Passphrase derivations running at once, at most (each takes 32 MiB and ~0.2 s of a core).
KDF_CONCURRENCY = 2
# Unknown, past its retention, or another tenant's: likewise one answer.
NO_RECEIPT = "no receipt has this receipt_id; check the id the create answered"
STORE_UNAVAILABLE = "the secret store is unavailable; retry after the time in Retry-After"
# What a 503 from /readyz says, by reason: what an operator reads, and what to look at.
NOT_READY_DETAIL = {
    UNREACHABLE: "the secret store does not answer; check that the database is up and reachable",
    REFUSING_WRITES: "the secret store answers but its recent writes failed; check the database",
    DISK_FULL: "the data directory's disk is full; free space and this replica recovers by itself",
}


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to infinity, which JSON cannot carry
        raise ValueError("number out of range")
    return value


def _check_content_type(request: Request) -> None:
    """JSON in UTF-8, or no Content-Type at all (old clients that never set one)."""
    header = request.headers.get("content-type")
    if header is None:
        return
    media_type, *params = (part.strip() for part in header.split(";"))
    charsets = [
        value.strip().strip('"').lower()
        for key, _, value in (param.partition("=") for param in params)
        if key.strip().lower() == "charset"
    ]
    if media_type.lower() != "application/json":
        raise HTTPException(
            415, "send the body as JSON with the header Content-Type: application/json"
        )
    refused = next((charset for charset in charsets if charset != "utf-8"), None)
    if refused is not None:
        raise HTTPException(
            415,
            f"charset {refused[:40]!r} is refused: send the body as UTF-8 JSON, with the header "
            "Content-Type: application/json (or application/json; charset=utf-8)",
        )


async def _json_object(request: Request) -> dict[str, Any]:
    _check_content_type(request)
    try:
        body = await request.body()
    except ClientDisconnect:
        # The client stalled past the read timeout or went away mid-body: its fault, not
        # ours, and the 400 is what the audit log records (the client will not read it).
        raise HTTPException(
            400, "the request body did not arrive completely; send the whole body"
        ) from None
    try:
        # Strict UTF-8: json.loads on bytes would also take UTF-16 and encoded surrogates.
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(
            400, f"request body is not UTF-8 (byte {exc.start} is invalid): send JSON in UTF-8"
        ) from None
    try:
        # Nothing JSON cannot carry, wherever it stands in the document: NaN, infinities,
        # and lone surrogates, which only a \u escape can produce (so only a body with one
        # pays for the re-encoding that finds them).
        data = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite,
        )
        if b"\\u" in body:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        raise HTTPException(
            400,
            f"request body is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}); "
            'send a JSON object, for example {"secret": "aGk="}',
        ) from None
    except UnicodeEncodeError:
        raise HTTPException(
            400,
            "request body holds a \\u escape of a lone surrogate, which is not text: send UTF-8",
        ) from None
    except ValueError as exc:  # refused by a hook above, or an int() of over 4300 digits
        reason = str(exc)
        if reason == "duplicate key":
            detail = "request body has a duplicate key: send each key once"
        elif reason.endswith(" is not JSON"):  # NaN, Infinity, -Infinity
            detail = (
                f"request body holds {reason.split()[0]}, which is not JSON: send finite numbers"
            )
        else:
            detail = "request body holds a number out of range (past a double, or over 4300 digits)"
        raise HTTPException(400, detail) from None
    except RecursionError:
        raise HTTPException(400, "request body is JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise HTTPException(
            400, 'request body must be a JSON object, for example {"secret": "aGk="}'
        )
    return data


def _optional_count(data: dict[str, Any], name: str, maximum: int, unit: str) -> int | None:
    """An optional JSON integer from 1 to ``maximum``: booleans, floats (``1.0`` too),
    strings and null are refused, like 0, negatives and values past the cap."""
    if name not in data:
        return None
    value = data[name]
    if type(value) is not int or not 1 <= value <= maximum:
        raise HTTPException(
            400, f"field {name!r} must be a JSON integer{unit} from 1 to {maximum}, or left out"
        )
    return value


def rfc3339(moment: dt.datetime) -> str:
    """``2026-12-01T15:04:05Z``: UTC, whole seconds."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lifecycle(record: SealedSecret) -> dict[str, Any]:
    """The answer's lifecycle and readers fields: present only for a secret that has them."""
    fields: dict[str, Any] = {}
    if record.expires_at is not None:
        fields["expires_at"] = rfc3339(record.expires_at)
    if record.reads_left is not None:
        fields["reads_left"] = record.reads_left
    if record.readers is not None:
        fields["readers"] = list(record.readers)
    return fields


def _idempotency_key(request: Request, caller: Caller) -> str | None:
    """The stored key of a create's ``Idempotency-Key`` header (scoped to the caller's API
    key), None without one; 400 for a malformed one, before the body is read."""
    values = request.headers.getlist("idempotency-key")
    if not values:
        return None
    if len(values) > 1 or not _IDEMPOTENCY_KEY.fullmatch(values[0]):
        raise HTTPException(
            400,
            "the Idempotency-Key header must be sent once, 1 to 255 printable ASCII "
            "characters (a UUID is a good one)",
        )
    return idempotency_key(caller.tenant, caller.name, values[0])


def _caller(context: RequestContext) -> Caller:
    """Who asks: the request's API key (the default tenant's anonymous caller without)."""
    return Caller(context.tenant or DEFAULT_TENANT, context.api_key_name)


def _readers(data: dict[str, Any], context: RequestContext) -> tuple[str, ...] | None:
    """A create's ``readers``: key names of the caller's tenant (400 for any other)."""
    if "readers" not in data:
        return None
    if context.keys is None:
        raise HTTPException(
            400,
            "field 'readers' names API keys, and this server has none configured: "
            "leave 'readers' out, or ask the operator to set API_KEYS_FILE",
        )
    try:
        readers = reader_names(data["readers"])
    except InvalidValue as exc:
        raise HTTPException(400, str(exc)) from None
    tenant = context.tenant or DEFAULT_TENANT
    known = context.keys.names_in(tenant)
    unknown = [name for name in readers if name not in known]
    if unknown:
        # A typo would lock the secret away for good: refuse, naming the names.
        listed = ", ".join(repr(name) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise HTTPException(
            400,
            f"field 'readers' names {listed}{more}, which {'is' if len(unknown) == 1 else 'are'}"
            f" no API key of tenant {tenant!r}: give key names of your tenant, without the "
            "tenant prefix",
        )
    return readers


def _actor(context: RequestContext, hash_secret_id: Callable[[str], str] | None) -> Actor | None:
    """Who this request's events name; None when no events are written."""
    if hash_secret_id is None:
        return None
    secret_id = context.secret_id
    return Actor(
        key_name=context.api_key_name,
        tenant=context.tenant,
        client_ip=context.client_ip,
        secret_id_hmac=None if secret_id is None else hash_secret_id(secret_id),
    )


def _wake_deliverer(request: Request) -> None:
    """Tell this process's webhook deliverer that events were just written, so it sends
    them now rather than at its next poll (app.state.webhooks: None without webhooks)."""
    deliverer = getattr(request.app.state, "webhooks", None)
    if deliverer is not None:
        deliverer.wake()


def _denied(
    context: RequestContext, op: str, reason: str, detail: str = NOT_FOUND
) -> HTTPException:
    """The 404 of a secret (or receipt) the caller may not see: the very answer an unknown
    id gets, audited and counted as the refusal it is."""
    context.outcome = "denied"
    ACCESS_DENIED.labels(op=op, reason=reason).inc()
    return HTTPException(404, detail)


def _receipt_fields(data: dict[str, Any]) -> tuple[bool, str | None]:
    """A create's ``receipt`` (a JSON boolean) and ``label`` (printable text)."""
    receipt = data.get("receipt", False)
    if type(receipt) is not bool:
        raise HTTPException(400, "field 'receipt' must be true or false, or left out")
    if "label" not in data:
        return receipt, None
    try:
        return receipt, label_text(data["label"])
    except InvalidValue as exc:
        raise HTTPException(400, str(exc)) from None


def rfc3339_ms(moment: dt.datetime | None) -> str | None:
    """``2026-12-01T15:04:05.123Z``: UTC, milliseconds; None stays None."""
    if moment is None:
        return None
    text = moment.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _status(receipt: Receipt) -> dict[str, Any]:
    """A receipt's answer: every field, null where it does not apply; for a secret under a
    passphrase, also the wrong passphrases tried."""
    reads_left = None if receipt.max_reads is None else max(receipt.max_reads - receipt.reads, 0)
    answer: dict[str, Any] = {
        "state": receipt.state,
        "label": receipt.label,
        "created_at": rfc3339_ms(receipt.created_at),
        "expires_at": None if receipt.expires_at is None else rfc3339(receipt.expires_at),
        "max_reads": receipt.max_reads,
        "reads_left": reads_left,
        "reads": receipt.reads,
        "first_read_at": rfc3339_ms(receipt.first_read_at),
        "last_read_at": rfc3339_ms(receipt.last_read_at),
        "ended_at": rfc3339_ms(receipt.ended_at),
    }
    if receipt.passphrase_failures is not None:
        answer["passphrase_failures"] = receipt.passphrase_failures
    return answer


def _passphrase(data: dict[str, Any]) -> str | None:
    """A create's or fetch's ``passphrase``, or None when there is none (400 if malformed)."""
    if "passphrase" not in data:
        return None
    try:
        return passphrase_text(data["passphrase"])
    except InvalidValue as exc:
        raise HTTPException(400, str(exc)) from None


def _wrong_passphrase(tries_left: int) -> str:
    """The detail of a 403 for a wrong passphrase, saying what the next wrong one costs."""
    if tries_left == 0:
        return "the passphrase is wrong, and that was the last try allowed: the secret is deleted"
    tries = "try" if tries_left == 1 else "tries"
    return f"the passphrase is wrong; after {tries_left} more wrong {tries} the secret is deleted"


def _string_field(data: dict[str, Any], name: str) -> str:
    if name not in data:
        raise HTTPException(400, f"field {name!r} is missing")
    value = data[name]
    if not isinstance(value, str):
        raise HTTPException(400, f"field {name!r} must be a string")
    return value


async def _secret_id_of(
    request: Request, context: RequestContext, op: str
) -> tuple[str, dict[str, Any]]:
    """The well-formed secret_id of a fetch or delete body (400 otherwise), named in the
    request context for the audit log, and the body; ``op`` is set first, so a refusal is
    audited too."""
    context.op = op
    data = await _json_object(request)
    try:
        secret_id = normalize_secret_id(_string_field(data, "secret_id"))
    except InvalidValue as exc:
        raise HTTPException(400, str(exc)) from None
    context.secret_id = secret_id
    return secret_id, data


class VaultAPI:
    """Endpoints bound to one keyring and one store."""

    def __init__(
        self,
        keyring: Keyring,
        store: SecretStore,
        *,
        max_secret_bytes: int,
        max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
        default_ttl_seconds: int = 0,
        unreadable: UnreadableRecords | None = None,
        retry_after: int = RETRY_AFTER_SECONDS,
        receipt_retention_seconds: float = 30 * 86400,
        hash_secret_id: Callable[[str], str] | None = None,
        idempotency_ttl_seconds: float = 86400,
        passphrase_max_attempts: int = 5,
    ) -> None:
        self.idempotency_ttl_seconds = idempotency_ttl_seconds
        self.passphrase_max_attempts = passphrase_max_attempts
        self._kdf_limiter: anyio.CapacityLimiter | None = None
        # Idempotency keys whose first create this process is handling (a repeat gets 409).
        self._in_flight: set[str] = set()
        self.retry_after = retry_after
        # Set when the store writes lifecycle events: each change's event names who made it
        # (vault/events.py Actor), the secret id by its audit HMAC made with this.
        self.hash_secret_id = hash_secret_id
        self.receipt_retention_seconds = receipt_retention_seconds
        self.keyring = keyring
        self.store = store
        self.unreadable = unreadable
        self.max_secret_bytes = max_secret_bytes
        self.max_ttl_seconds = max_ttl_seconds
        self.default_ttl_seconds = default_ttl_seconds

    async def create_secret(self, request: Request) -> Response:
        context = request_context(request.scope)
        context.op = "create"
        key = _idempotency_key(request, _caller(context))
        if key is None:
            return await self._create(request, context, None)
        # A repeat while the first is in flight in this process is refused before its body
        # is read; across processes the store's record of the key decides (_repeat).
        if key in self._in_flight:
            raise HTTPException(409, IN_FLIGHT, headers={"Retry-After": "1"})
        self._in_flight.add(key)
        try:
            return await self._create(request, context, key)
        finally:
            self._in_flight.discard(key)

    async def _derive(self, passphrase: str, secret_id: str, kdf: str) -> bytes:
        """The key of a secret's passphrase layer, derived in a thread (a few at a time:
        each takes memory and a core's fraction of a second)."""
        if self._kdf_limiter is None:
            self._kdf_limiter = anyio.CapacityLimiter(KDF_CONCURRENCY)
        return await anyio.to_thread.run_sync(
            derive_passphrase_key, passphrase, secret_id, kdf, limiter=self._kdf_limiter
        )

    async def _new_secret(
        self, data: dict[str, Any], context: RequestContext
    ) -> tuple[SealedSecret, dict[str, Any]]:
        """A create's record, sealed, and the answer that hands out its id."""
        try:
            plaintext = decode_secret(_string_field(data, "secret"))
        except InvalidValue as exc:
            raise HTTPException(400, str(exc)) from None
        if len(plaintext) > self.max_secret_bytes:
            raise HTTPException(
                413,
                f"secret is {len(plaintext)} bytes once decoded; "
                f"the limit is {self.max_secret_bytes} bytes",
            )
        ttl = _optional_count(data, "ttl_seconds", self.max_ttl_seconds, " number of seconds")
        max_reads = _optional_count(data, "max_reads", MAX_READS, "")
        if ttl is None and self.default_ttl_seconds:
            ttl = self.default_ttl_seconds
        readers = _readers(data, context)
        receipt, label = _receipt_fields(data)
        passphrase = _passphrase(data)
        caller = _caller(context)
        secret_id = str(uuid.uuid4())
        kdf = None
        if passphrase is not None:
            # Sealed twice: under a key only the passphrase gives, then under the master
            # key, so neither the database nor the master key alone opens it.
            kdf = SCRYPT_KDF
            plaintext = lock(await self._derive(passphrase, secret_id, kdf), plaintext)
        # Stored and sealed under the digest of the id: the id itself is never written. Who
        # may see it is sealed in too: the caller's tenant, and for named readers, the
        # caller's key (the owner, who may delete it).
        record = self.keyring.seal(
            record_key(secret_id),
            plaintext,
            tenant=caller.tenant,
            owner=None if readers is None else caller.name,
            readers=readers,
            kdf=kdf,
        )
        if ttl is not None or max_reads is not None:
            # Whole seconds, rounded up: a secret lives at least ttl_seconds.
            expires_at = (
                dt.datetime.fromtimestamp(math.ceil(time.time()) + ttl, dt.UTC)
                if ttl is not None
                else None
            )
            record = replace(record, expires_at=expires_at, reads_left=max_reads)
        # A receipt is a capability of its own: it asks what became of the secret, never
        # reads it; the answer hands it out once.
        receipt_id = str(uuid.uuid4()) if receipt else None
        if receipt_id is not None or label is not None:
            record = replace(record, receipt_id=receipt_id, label=label)
        answer = {"secret_id": secret_id, **_lifecycle(record)}
        if receipt_id is not None:
            answer["receipt_id"] = receipt_id
        return record, answer

    async def _create(self, request: Request, context: RequestContext, key: str | None) -> Response:
        data = await _json_object(request)
        record, answer = await self._new_secret(data, context)
        response = JSONResponse(answer)
        idempotent = None
        # The body only as the keyed digest of its JSON object, written one way (key order
        # and whitespace aside, a retry that serializes it again is the same request): it
        # holds the secret and any passphrase, which a bare hash would let a reader of the
        # database test guesses against. The answer is sealed (it names the secret id).
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        body = canonical.encode("utf-8")
        if key is not None:
            now = utc_now()
            idempotent = IdempotentCreate(
                key=key,
                body_digest=self.keyring.digest(body),
                answer=self.keyring.seal(key, bytes(response.body)),
                record_key=record.record_key,
                created_at=now,
                expires_at=now + dt.timedelta(seconds=self.idempotency_ttl_seconds),
            )
        context.secret_id = answer["secret_id"]  # named by the audit record
        # The answer is 200 once stored: its audit record goes in the same store call.
        audit = None if context.audit is None else context.audit.record(200)
        try:
            context.audit_written = await self.store.insert(
                record, audit, _actor(context, self.hash_secret_id), idempotent
            )
            if self.hash_secret_id is not None:
                _wake_deliverer(request)
        except IdempotentRepeat as repeat:
            context.secret_id = None  # this request's id was never stored nor handed out
            return self._repeat(repeat.existing, body, context)
        except BaseException:
            context.secret_id = None  # never handed out: the failure's record names no id
            raise
        return response

    def _repeat(self, first: IdempotentCreate, body: bytes, context: RequestContext) -> Response:
        """The answer to a create whose Idempotency-Key is stored: the first's answer, byte
        for byte, if the body (``body``: its canonical JSON) is the same and the first is
        done."""
        if not self.keyring.same_digest(first.body_digest, body):
            raise HTTPException(422, KEY_REUSED)
        if first.state != "done":
            raise HTTPException(409, IN_FLIGHT, headers={"Retry-After": "1"})
        body = self.keyring.open(first.answer)
        context.outcome = "replayed"
        context.secret_id = json.loads(body)["secret_id"]  # the audit names the secret
        return Response(
            body, media_type="application/json", headers={"Idempotent-Replayed": "true"}
        )

    async def fetch_secret(self, request: Request) -> Response:
        context = request_context(request.scope)
        secret_id, data = await _secret_id_of(request, context, "fetch")
        passphrase = _passphrase(data)
        given = None
        if passphrase is not None:
            given = Passphrase(max_attempts=self.passphrase_max_attempts)
        # Its status is decided in the store call, which writes it stamped for that answer.
        audit = None if context.audit is None else context.audit.record(200)

        async def fetch(brought: Passphrase | None) -> Any:
            return await self.store.fetch(
                secret_id,
                self.keyring,
                audit,
                _caller(context),
                _actor(context, self.hash_secret_id),
                brought,
            )

        try:
            fetched, context.audit_written = await fetch(given)
            if fetched.found is Found.UNLOCK and fetched.record is not None:
                # Under a passphrase, which was given: its key is derived with the record's
                # own derivation, off the store call, and the store asked again (the answer,
                # its read and its audit record all come from that second call).
                kdf = fetched.record.kdf or ""
                key = await self._derive(passphrase or "", secret_id, kdf)
                fetched, context.audit_written = await fetch(
                    Passphrase(key=key, kdf=kdf, max_attempts=self.passphrase_max_attempts)
                )
            if self.hash_secret_id is not None:
                _wake_deliverer(request)
        except DecryptionFailed:
            if self.unreadable is not None:
                self.unreadable.failed_authentication(record_key(secret_id))
            raise
        if fetched.denied is not None:
            raise _denied(context, "fetch", fetched.denied.value)
        if fetched.found is Found.PASSPHRASE:
            context.outcome = "denied"
            ACCESS_DENIED.labels(op="fetch", reason="passphrase").inc()
            if fetched.tries_left is None:
                raise HTTPException(403, LOCKED)
            if fetched.tries_left == 0:
                SECRETS_DELETED.labels("passphrase").inc()  # deleted in the same call
            raise HTTPException(403, _wrong_passphrase(fetched.tries_left))
        if fetched.found is Found.EXPIRED:
            context.outcome = fetched.found.outcome
        if fetched.record is None or fetched.plaintext is None:
            if fetched.found is Found.MISSING and self.unreadable is not None:
                self.unreadable.gone(record_key(secret_id))
            raise HTTPException(fetched.found.status, NOT_FOUND)
        if fetched.record.reads_left == 0:
            SECRETS_DELETED.labels("last_read").inc()  # deleted in the same call
        secret = base64.b64encode(fetched.plaintext).decode("ascii")
        return JSONResponse({"secret": secret, **_lifecycle(fetched.record)})

    async def delete_secret(self, request: Request) -> Response:
        context = request_context(request.scope)
        secret_id, _ = await _secret_id_of(request, context, "delete")
        result = await self.store.delete(
            secret_id, _caller(context), _actor(context, self.hash_secret_id)
        )
        if self.hash_secret_id is not None:
            _wake_deliverer(request)
        if result.denied is not None:
            raise _denied(context, "delete", result.denied.value)
        if self.unreadable is not None:
            self.unreadable.gone(record_key(secret_id))
        if result is DeleteResult.EXPIRED:
            context.outcome = "expired"
        if result is not DeleteResult.DELETED:
            raise HTTPException(404, NOT_FOUND)
        return JSONResponse({"secret_id": secret_id, "deleted": True})

    async def secret_status(self, request: Request) -> Response:
        """What became of a secret made with a receipt; never spends a read."""
        context = request_context(request.scope)
        context.op = "status"
        data = await _json_object(request)
        try:
            receipt_id = normalize_secret_id(_string_field(data, "receipt_id"), "receipt_id")
        except InvalidValue as exc:
            raise HTTPException(400, str(exc)) from None
        context.secret_id = receipt_id  # audited by its HMAC, as a secret id is
        receipt = await self.store.receipt(receipt_id)
        now = utc_now()
        if receipt is None or not receipt_kept(receipt, now, self.receipt_retention_seconds):
            raise HTTPException(404, NO_RECEIPT)
        if receipt.tenant != _caller(context).tenant:
            raise _denied(context, "status", "tenant", NO_RECEIPT)
        return JSONResponse(_status(receipt_as_of(receipt, now)))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """200 when the store answers and its last write succeeded; else 503 saying why.

        A 200 also says how many records no configured key can open (null until counted):
        information for the operator, not a reason to take the replica out of service.
        """
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            reason = exc.reason if isinstance(exc, NotReady) else UNREACHABLE
            NOT_READY.labels(reason=reason).inc()
            return JSONResponse(
                {"status": "not ready", "reason": reason, "detail": NOT_READY_DETAIL[reason]},
                status_code=503,
                headers={"Retry-After": str(self.retry_after)},
            )
        count = None if self.unreadable is None else self.unreadable.count
        return JSONResponse({"status": "ready", "records_unreadable": count})

    def routes(
        self,
        *,
        max_body_bytes: int,
        metrics: ASGIApp | None = None,
        api_keys: bool = False,
        metrics_token: bool = False,
    ) -> list[BaseRoute]:
        """The route table; ``metrics`` is the /metrics app when metrics are enabled."""
        spec = build_openapi(
            max_secret_bytes=self.max_secret_bytes,
            max_ttl_seconds=self.max_ttl_seconds,
            max_body_bytes=max_body_bytes,
            metrics=metrics is not None,
            api_keys=api_keys,
            metrics_token=metrics_token,
        )

        async def openapi(request: Request) -> Response:
            return JSONResponse(spec)

        async def docs(request: Request) -> Response:
            return HTMLResponse(DOCS_HTML)

        endpoints = {
            "create": self.create_secret,
            "fetch": self.fetch_secret,
            "delete": self.delete_secret,
            "status": self.secret_status,
        }
        return [
            *(Route(path, endpoints[op], methods=["POST"]) for path, op in OPERATIONS.items()),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/docs", docs, methods=["GET"]),
            Mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path)),
            # Route, not Mount: with slash redirects off a Mount would only match /metrics/.
            *([Route("/metrics", metrics)] if metrics is not None else []),
        ]


def _api_paths() -> str:
    """``POST /vault/secret/create/, ... and POST /vault/secret/delete``: one spelling each."""
    canonical: dict[str, str] = {}
    for path, op in OPERATIONS.items():
        canonical.setdefault(op, path)
    spelled = [f"POST {path}" for path in canonical.values()]
    return ", ".join(spelled[:-1]) + " and " + spelled[-1] if len(spelled) > 1 else spelled[0]


NOT_FOUND_DETAIL = (
    f"no such path: this service answers {_api_paths()} (GET /docs describes them all)"
)


async def http_error(request: Request, exc: Exception) -> Response:
    """Every HTTPException as ``{"detail": ...}``; the router's bare 404 and 405 say what to
    do instead, like every other error, rather than just "Not Found"."""
    if not isinstance(exc, HTTPException):  # pragma: no cover - registered for it only
        raise exc
    detail = exc.detail
    headers = exc.headers
    if exc.status_code == 404 and detail == "Not Found":
        detail = NOT_FOUND_DETAIL
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        allowed = (headers or {}).get("Allow", "")
        use = " or ".join(m for m in allowed.split(", ") if m and m != "HEAD") or "another method"
        detail = f"{request.method} is not allowed on this path; use {use}"
    return error_answer(exc.status_code, detail, headers=headers)


def unavailable_response(retry_after: int = RETRY_AFTER_SECONDS) -> Response:
    """The 503 of a store that did not answer."""
    return error_answer(503, STORE_UNAVAILABLE, retry_after=retry_after)
