"""The OpenAPI 3.0 document of the API, and a Swagger UI page served from packaged assets.

OpenAPI 3.0 rather than 3.1 because the packaged Swagger UI (version 4) renders 3.0.

The document is put together from parts: one per operation (create, fetch, delete), one for
the health probes, one for this document and its page, one for the metrics; each part gives
its paths and the component schemas they refer to. Error answers come from shared builders,
and the patterns a client's values must match are vault/validation.py's own.

Each secret operation is listed once, under its canonical path; the other spelling of that
path (vault/routes.py answers both) is named in its description, not listed a second time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from vault import __version__
from vault.settings import DEFAULT_MAX_TTL_SECONDS, MAX_READS
from vault.validation import (
    BASE64_PATTERN,
    KEY_NAME_PATTERN,
    LABEL_PATTERN,
    MAX_LABEL,
    MAX_PASSPHRASE,
    MAX_READERS,
    UUID_PATTERN,
)

# RFC 3339 as the API writes it: UTC ("Z"), whole seconds.
_UTC_SECONDS_PATTERN = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"

Json = dict[str, Any]

# The groups Swagger UI shows the operations in, in this order.
SECRETS, HEALTH, METRICS, DOCUMENTATION = "secrets", "health", "metrics", "documentation"
_TAGS = {
    SECRETS: "Store a secret, fetch it back by its id, delete it.",
    HEALTH: "Liveness and readiness probes, for a load balancer or an orchestrator.",
    METRICS: "Prometheus metrics (when METRICS_ENABLED is on).",
    DOCUMENTATION: "This document, and Swagger UI for it.",
}


class _Part(NamedTuple):
    """A piece of the document: path items by path, and the schemas they refer to by name."""

    paths: Json
    schemas: Json


def build_openapi(
    *,
    max_secret_bytes: int,
    max_body_bytes: int,
    metrics: bool = False,
    api_keys: bool = False,
    metrics_token: bool = False,
    max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
) -> Json:
    """The whole document; the limits in it are the ones this server enforces."""
    errors = _common_errors(max_body_bytes, api_keys=api_keys)
    security: Json = {"security": [{"apiKey": []}]} if api_keys else {}
    parts = [
        _create(
            errors, security, max_secret_bytes, max_body_bytes, max_ttl_seconds, api_keys=api_keys
        ),
        _fetch(errors, security),
        _delete(errors, security),
        _receipt_status(errors, security),
        _health(),
        _self_description(),
        *([_metrics(metrics_token)] if metrics else []),
    ]
    schemes = {
        **({"apiKey": {"type": "http", "scheme": "bearer"}} if api_keys else {}),
        **({"metricsToken": {"type": "http", "scheme": "bearer"}} if metrics_token else {}),
    }
    schemas = {name: schema for part in parts for name, schema in part.schemas.items()}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "secret-manager",
            "version": __version__,
            "description": "Stores secrets encrypted with AES-256-GCM and hands them back by id.",
        },
        "tags": [
            {"name": name, "description": description}
            for name, description in _TAGS.items()
            if metrics or name != METRICS
        ],
        "paths": {path: item for part in parts for path, item in part.paths.items()},
        "components": {
            **({"securitySchemes": schemes} if schemes else {}),
            "schemas": {**schemas, "Error": _error_schema()},
        },
    }


# --- errors, shared by every operation ------------------------------------------------------


def _error(
    description: str, *, retry_after: bool = False, challenge: bool = False
) -> dict[str, Any]:
    """An error answer: ``{"detail": ...}``, with the headers that come with it."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    headers: dict[str, Any] = {}
    if challenge:
        headers = {
            "WWW-Authenticate": {
                "description": 'Bearer realm="secret-manager", with error="invalid_token" '
                "when a token was sent but is wrong.",
                "schema": {"type": "string"},
            }
        }
    if retry_after:
        headers["Retry-After"] = {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer"},
        }
    if headers:
        response["headers"] = headers
    return response


def _common_errors(max_body_bytes: int, *, api_keys: bool) -> Json:
    """The errors any secret operation can answer, by status."""
    unauthorized = _error(
        "Missing or unknown API key (Authorization: Bearer <token>).", challenge=True
    )
    forbidden = _error(
        "The API key's scopes do not include this operation; nothing was read or changed.",
        challenge=True,
    )
    return {
        "400": _error("The body is not a JSON object, or a field is missing or malformed."),
        "413": _error(f"The request body exceeds {max_body_bytes} bytes."),
        "408": _error("The body did not arrive whole in time."),
        "415": _error("The body was not sent as application/json."),
        "429": _error(
            f"Too many requests from this client{' or with this API key' if api_keys else ''}; "
            "see Retry-After and RateLimit-* headers.",
            retry_after=True,
        ),
        "500": _error("Internal error; the X-Server-Request-ID header identifies it in the log."),
        **({"401": unauthorized, "403": forbidden} if api_keys else {}),
        "503": _error("The store is unreachable; retry later.", retry_after=True),
    }


def _not_found() -> Json:
    """The one 404 of fetch and delete: no oracle between its causes."""
    return _error(
        "No secret has this id for this caller: it never existed, expired, had its reads "
        "used up or was deleted, or it is not the caller's to see (another tenant's, or made "
        "for other readers). The same answer for all of them."
    )


def _readers(description: str) -> Json:
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_READERS,
        "uniqueItems": True,
        "items": {"type": "string", "pattern": KEY_NAME_PATTERN},
        "description": description,
    }


def _error_schema() -> Json:
    return {
        "type": "object",
        "required": ["detail"],
        "properties": {
            "detail": {
                "type": "string",
                "description": "What went wrong and what to do about it.",
            }
        },
    }


# --- small shared pieces ----------------------------------------------------------------------


def _json(ref: str, description: str) -> dict[str, Any]:
    """An answer whose JSON body is the component schema ``ref``."""
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _json_body(ref: str) -> Json:
    """A required JSON request body, the component schema ``ref``."""
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _also_at(other: str, how: str) -> str:
    """The sentence that names a secret path's other spelling, which is not listed again."""
    return (
        f" Also answers at `{other}` ({how}), directly: never with a redirect, which many "
        "clients follow without the body."
    )


def _expires_at() -> Json:
    return {
        "type": "string",
        "format": "date-time",
        "pattern": _UTC_SECONDS_PATTERN,
        "description": (
            "When the secret expires: RFC 3339, UTC, whole seconds, e.g. 2026-12-01T15:04:05Z. "
            "Only for an expiring secret."
        ),
    }


def _reads_left(minimum: int, description: str) -> Json:
    return {"type": "integer", "maximum": MAX_READS, "minimum": minimum, "description": description}


def _secret_id_request() -> Json:
    """The body of a fetch or a delete: the id, in the body, never in the URL."""
    return {
        "type": "object",
        "required": ["secret_id"],
        "properties": {"secret_id": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN}},
    }


def _passphrase(description: str) -> Json:
    """A create's or fetch's ``passphrase`` (vault/validation.py ``passphrase_text``)."""
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_PASSPHRASE,
        "description": f"1 to {MAX_PASSPHRASE} characters (compared in Unicode NFC). "
        + description,
    }


# --- the secret operations --------------------------------------------------------------------


def _create(
    errors: Json,
    security: Json,
    max_secret_bytes: int,
    max_body_bytes: int,
    max_ttl_seconds: int,
    *,
    api_keys: bool,
) -> _Part:
    """POST /vault/secret/create/: store a secret; its id is linked into fetch and delete."""
    # Swagger UI shows these links, and schemathesis's stateful run follows them.
    links = {
        name: {
            "operationId": operation_id,
            "requestBody": {"secret_id": "$response.body#/secret_id"},
            "description": description,
        }
        for name, operation_id, description in (
            ("FetchSecret", "fetchSecret", "Fetch the secret just stored."),
            ("DeleteSecret", "deleteSecret", "Delete the secret just stored."),
        )
    }
    operation = {
        **security,
        "summary": "Store a secret",
        "description": (
            "Encrypts the secret and returns the id that fetches it back. With `ttl_seconds` "
            "it expires that long after it is stored (the answer says when, in `expires_at`); "
            "with `max_reads` the fetch that uses the last read deletes it; with `passphrase` "
            "only a fetch that brings it gets the secret."
            + _also_at("/vault/secret/create", "without the trailing slash")
        ),
        "operationId": "createSecret",
        "tags": [SECRETS],
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[ -~]+$",
                },
                "description": (
                    "Makes a retried create safe: a repeat with the same key and the same body "
                    "within IDEMPOTENCY_TTL_SECONDS gets the first answer again (header "
                    "Idempotent-Replayed: true) and stores nothing. 1-255 printable ASCII "
                    "characters, scoped to the API key; a UUID per create is a good one."
                ),
            }
        ],
        "requestBody": _json_body("CreateRequest"),
        "responses": {
            "200": {
                **_json("CreateResponse", "Stored, or the first answer to this Idempotency-Key."),
                "links": links,
                "headers": {
                    "Idempotent-Replayed": {
                        "description": "true when this is the stored answer to a repeat.",
                        "schema": {"type": "string", "enum": ["true"]},
                    }
                },
            },
            **errors,
            "409": _error(
                "A create with this Idempotency-Key is still in progress; retry after "
                "Retry-After to get its answer.",
                retry_after=True,
            ),
            "422": _error(
                "This Idempotency-Key was used with a different request body within its window."
            ),
            "400": _error(
                "The body is not a JSON object, `secret` is missing or not strict base64, or "
                "`ttl_seconds` or `max_reads` is not a JSON integer in its range, or `label` or "
                "`passphrase` is not a string of its length (the detail names the field and "
                "the range), or the Idempotency-Key header is malformed"
                + (
                    ", or `readers` names a key that is not one of the caller's tenant (the "
                    "detail names it)."
                    if api_keys
                    else "."
                )
            ),
            "413": _error(
                f"The decoded secret exceeds {max_secret_bytes} bytes, "
                f"or the request body exceeds {max_body_bytes} bytes."
            ),
        },
    }
    request = _create_request(max_secret_bytes, max_ttl_seconds)
    answer: Json = {
        "type": "object",
        "required": ["secret_id"],
        "properties": {
            "secret_id": {"type": "string", "format": "uuid"},
            "expires_at": _expires_at(),
            "reads_left": _reads_left(1, "The reads allowed (max_reads); only when limited."),
            "receipt_id": {
                "type": "string",
                "format": "uuid",
                "description": (
                    "Only with `receipt: true`: the id that asks the secret's status "
                    "(POST /vault/secret/status). A capability of its own: it never reads "
                    "the secret, and the secret_id never asks the status."
                ),
            },
        },
    }
    request["properties"]["receipt"] = {
        "type": "boolean",
        "description": (
            "true: keep a receipt of what becomes of the secret (reads, its end), and answer "
            "its `receipt_id`. Without it (or false) the answer is as without receipts."
        ),
    }
    request["properties"]["label"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_LABEL,
        "pattern": LABEL_PATTERN,
        "description": (
            f"1 to {MAX_LABEL} printable characters for the creator's own bookkeeping, "
            "stored beside the secret and shown by its status and webhook events. Not secret."
        ),
    }
    request["properties"]["passphrase"] = _passphrase(
        "The secret is then sealed under a key derived from it (scrypt) as well as under the "
        "master key, and a fetch must bring the same `passphrase`: without it, or with a "
        "wrong one, the fetch answers 403 and spends no read; after "
        "PASSPHRASE_MAX_ATTEMPTS wrong ones the secret is deleted. Never stored nor logged."
    )
    if api_keys:  # readers are API key names: without keys there are none to name
        request["properties"]["readers"] = _readers(
            "The only API keys that may fetch the secret: names of keys of the caller's "
            "tenant, without the tenant prefix. They and the key that made it may delete it; "
            "any other key gets the 404 of an unknown id. A name that is no key of the "
            "tenant is refused (400). Without it, every key of the tenant may."
        )
        answer["properties"]["readers"] = _readers("The readers, when they were given.")
    schemas = {"CreateRequest": request, "CreateResponse": answer}
    return _Part({"/vault/secret/create/": {"post": operation}}, schemas)


def _create_request(max_secret_bytes: int, max_ttl_seconds: int) -> Json:
    return {
        "type": "object",
        "required": ["secret"],
        "properties": {
            "secret": {
                "type": "string",
                "format": "byte",
                "minLength": 4,
                "pattern": BASE64_PATTERN,
                "description": (
                    "Standard base64 with padding, no whitespace; "
                    f"at most {max_secret_bytes} bytes once decoded."
                ),
            },
            "ttl_seconds": {
                "type": "integer",
                "minimum": 1,
                "maximum": max_ttl_seconds,
                "description": (
                    "Seconds the secret lives at least; after that it is never "
                    "served again. A JSON integer (not 1.0, not a string). "
                    "Without it, the server's SECRET_DEFAULT_TTL_SECONDS applies "
                    "(by default none: the secret never expires)."
                ),
            },
            "max_reads": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_READS,
                "description": (
                    "Fetches allowed; the one that uses the last read deletes the "
                    "secret. Exact, however many fetches race. A JSON integer."
                ),
            },
        },
    }


def _fetch(errors: Json, security: Json) -> _Part:
    """POST /vault/secret/fetch: the secret stored under an id."""
    locked = (
        "The secret is protected by a passphrase and the body brings none, or a wrong one "
        "(the detail says so, and how many more wrong ones delete it; the one that reaches "
        "PASSPHRASE_MAX_ATTEMPTS does). No read is spent."
    )
    forbidden = errors.get("403")  # with API keys: a key without the fetch scope
    if forbidden is not None:
        locked = f"{forbidden['description']} Or: {locked[0].lower()}{locked[1:]}"
    operation = {
        **security,
        "summary": "Fetch a secret",
        "description": (
            "Returns the secret stored under the id, with `reads_left` (the reads remaining "
            "after this one) for a read-limited secret and `expires_at` for an expiring one. "
            "A secret created with a `passphrase` is returned only to a fetch that brings it."
            + _also_at("/vault/secret/fetch/", "with a trailing slash")
        ),
        "operationId": "fetchSecret",
        "tags": [SECRETS],
        "requestBody": _json_body("FetchRequest"),
        "responses": {
            "200": _json("FetchResponse", "The secret."),
            "404": _not_found(),
            **errors,
            "403": {**(forbidden or _error("")), "description": locked},
        },
    }
    request = _secret_id_request()
    request["properties"]["passphrase"] = _passphrase(
        "Only for a secret created with one: the same passphrase. Ignored for any other."
    )
    schemas = {
        "FetchRequest": request,
        "FetchResponse": {
            "type": "object",
            "required": ["secret"],
            "properties": {
                "secret": {"type": "string", "format": "byte"},
                "expires_at": _expires_at(),
                "reads_left": _reads_left(
                    0,
                    "Reads remaining after this one; only for a read-limited "
                    "secret (0: this was the last, and the secret is gone).",
                ),
                "readers": _readers("The readers, for a secret made for named readers."),
            },
        },
    }
    return _Part({"/vault/secret/fetch": {"post": operation}}, schemas)


def _delete(errors: Json, security: Json) -> _Part:
    """POST /vault/secret/delete: remove the secret stored under an id."""
    operation = {
        **security,
        "summary": "Delete a secret",
        "description": (
            "Removes the secret stored under the id from the store (its ciphertext is gone, "
            "not flagged). The id travels in the body, never in the URL."
            + _also_at("/vault/secret/delete/", "with a trailing slash")
        ),
        "operationId": "deleteSecret",
        "tags": [SECRETS],
        "requestBody": _json_body("DeleteRequest"),
        "responses": {
            "200": _json("DeleteResponse", "Deleted."),
            "404": _not_found(),
            **errors,
        },
    }
    schemas = {
        "DeleteRequest": _secret_id_request(),
        "DeleteResponse": {
            "type": "object",
            "required": ["secret_id", "deleted"],
            "properties": {
                "secret_id": {"type": "string", "format": "uuid"},
                "deleted": {"type": "boolean", "enum": [True]},
            },
        },
    }
    return _Part({"/vault/secret/delete": {"post": operation}}, schemas)


def _receipt_status(errors: Json, security: Json) -> _Part:
    """POST /vault/secret/status: what became of a secret made with a receipt."""
    moment = {"type": "string", "format": "date-time", "nullable": True}
    operation = {
        **security,
        "summary": "Ask what became of a secret",
        "description": (
            "Answers the status of the secret a receipt was made for: never the secret, and "
            "it spends no read. It keeps answering after the secret ends (used up, expired, "
            "deleted) until RECEIPT_RETENTION_SECONDS after the end. Every field is present; "
            "those that do not apply are null (but `passphrase_failures`, there only for a "
            "secret created with a passphrase)."
            + _also_at("/vault/secret/status/", "with a trailing slash")
        ),
        "operationId": "secretStatus",
        "tags": [SECRETS],
        "requestBody": _json_body("StatusRequest"),
        "responses": {
            "200": _json("StatusResponse", "The secret's status."),
            "404": _error(
                "No receipt has this id for this caller: it never existed, its retention "
                "ended, or it is another tenant's (the same answer for all of them)."
            ),
            **errors,
        },
    }
    schemas = {
        "StatusRequest": {
            "type": "object",
            "required": ["receipt_id"],
            "properties": {
                "receipt_id": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN}
            },
        },
        "StatusResponse": {
            "type": "object",
            "required": [
                "state",
                "label",
                "created_at",
                "expires_at",
                "max_reads",
                "reads_left",
                "reads",
                "first_read_at",
                "last_read_at",
                "ended_at",
            ],
            "properties": {
                "state": {
                    "type": "string",
                    "enum": ["active", "used_up", "expired", "deleted"],
                    "description": "active until the secret ends; then how it ended.",
                },
                "label": {"type": "string", "nullable": True, "description": "As created."},
                "created_at": {**moment, "nullable": False, "description": "When stored (ms)."},
                "expires_at": {
                    **moment,
                    "description": "When it expires (whole seconds); null: never.",
                },
                "max_reads": {
                    "type": "integer",
                    "nullable": True,
                    "description": "The reads it was made with; null: no read limit.",
                },
                "reads_left": {
                    "type": "integer",
                    "nullable": True,
                    "minimum": 0,
                    "description": "Reads remaining; null: no read limit.",
                },
                "reads": {"type": "integer", "minimum": 0, "description": "Fetches served."},
                "passphrase_failures": {
                    "type": "integer",
                    "minimum": 0,
                    "description": (
                        "Wrong passphrases tried so far; only for a secret created with a "
                        "passphrase (at PASSPHRASE_MAX_ATTEMPTS it was deleted)."
                    ),
                },
                "first_read_at": {**moment, "description": "The first fetch served; null: none."},
                "last_read_at": {**moment, "description": "The last fetch served; null: none."},
                "ended_at": {
                    **moment,
                    "description": "When it was used up, deleted or expired; null while active.",
                },
            },
        },
    }
    return _Part({"/vault/secret/status": {"post": operation}}, schemas)


# --- everything else: probes, this document, metrics ------------------------------------------


def _health() -> _Part:
    """GET /healthz (liveness) and GET /readyz (readiness)."""
    healthz = {
        "summary": "Liveness",
        "operationId": "healthz",
        "tags": [HEALTH],
        "responses": {"200": _json("Status", "The process is running.")},
    }
    readyz = {
        "summary": "Readiness",
        "operationId": "readyz",
        "tags": [HEALTH],
        "responses": {
            "200": _json(
                "ReadyStatus",
                "The store answers and takes writes; `records_unreadable` counts"
                " the live records no configured key can open (null until first"
                " counted): information, readiness does not depend on it.",
            ),
            "503": _error(
                "Not ready: the body's `reason` is `store unreachable`,"
                " `store refusing writes` or `disk full`.",
                retry_after=True,
            ),
        },
    }
    schemas = {
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}},
        },
        "ReadyStatus": {
            "type": "object",
            "required": ["status", "records_unreadable"],
            "properties": {
                "status": {"type": "string", "enum": ["ready"]},
                "records_unreadable": {"type": "integer", "minimum": 0, "nullable": True},
            },
        },
    }
    return _Part({"/healthz": {"get": healthz}, "/readyz": {"get": readyz}}, schemas)


def _self_description() -> _Part:
    """GET /openapi.json (this document) and GET /docs (Swagger UI for it)."""
    openapi = {
        "summary": "This document",
        "operationId": "openapi",
        "tags": [DOCUMENTATION],
        "responses": {
            "200": {
                "description": "The OpenAPI document.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    }
    docs = {
        "summary": "Swagger UI for this document, served from packaged assets",
        "operationId": "docs",
        "tags": [DOCUMENTATION],
        "responses": {
            "200": {
                "description": "The Swagger UI page.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    }
    return _Part({"/openapi.json": {"get": openapi}, "/docs": {"get": docs}}, {})


def _metrics(metrics_token: bool) -> _Part:
    """GET /metrics, behind METRICS_TOKEN when one is set."""
    unauthorized = _error(
        "Missing or wrong METRICS_TOKEN (Authorization: Bearer <token>).", challenge=True
    )
    operation = {
        **({"security": [{"metricsToken": []}]} if metrics_token else {}),
        "summary": "Prometheus metrics",
        "operationId": "metrics",
        "tags": [METRICS],
        "responses": {
            "200": {
                "description": "Prometheus text exposition.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **({"401": unauthorized} if metrics_token else {}),
        },
    }
    return _Part({"/metrics": {"get": operation}}, {})


DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>secret-manager API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script>
    // validatorUrl: null keeps Swagger UI from sending this URL to validator.swagger.io.
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", validatorUrl: null});
  </script>
</body>
</html>
"""
