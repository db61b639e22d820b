"""The OpenAPI 3.0 document of the API, and a Swagger UI page served from packaged assets.

OpenAPI 3.0 rather than 3.1 because the packaged Swagger UI (version 4) renders 3.0.
"""

from __future__ import annotations

from typing import Any

from vault import __version__
from vault.settings import DEFAULT_MAX_TTL_SECONDS, MAX_READS

_UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# Exactly what the server accepts: canonical standard base64 of at least one byte (the bits
# a padded last group leaves unused must be zero, so "ab==" is refused and "aQ==" is not).
BASE64_PATTERN = (
    "^(?:[A-Za-z0-9+/]{4})*"
    "(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$"
)
# RFC 3339 as the API writes it: UTC ("Z"), whole seconds.
_UTC_SECONDS_PATTERN = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"


def _error(
    description: str, *, retry_after: bool = False, challenge: bool = False
) -> dict[str, Any]:
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


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def build_openapi(
    *,
    max_secret_bytes: int,
    max_body_bytes: int,
    metrics: bool = False,
    api_keys: bool = False,
    metrics_token: bool = False,
    max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
) -> dict[str, Any]:
    """The whole document; the limits in it are the ones this server enforces."""
    common_errors = {
        "400": _error("The body is not a JSON object, or a field is missing or malformed."),
        "413": _error(f"The request body exceeds {max_body_bytes} bytes."),
        "408": _error("The body did not arrive whole in time."),
        "415": _error("The body was not sent as application/json."),
        "429": _error(
            "Too many requests from this client; see Retry-After and RateLimit-* headers.",
            retry_after=True,
        ),
        "500": _error("Internal error; the X-Request-ID header identifies it in the log."),
        **(
            {
                "401": _error(
                    "Missing or unknown API key (Authorization: Bearer <token>).", challenge=True
                )
            }
            if api_keys
            else {}
        ),
        "503": _error("The store is unreachable; retry later.", retry_after=True),
    }
    security: dict[str, Any] = {"security": [{"apiKey": []}]} if api_keys else {}
    expires_at = {
        "type": "string",
        "format": "date-time",
        "pattern": _UTC_SECONDS_PATTERN,
        "description": (
            "When the secret expires: RFC 3339, UTC, whole seconds, e.g. 2026-12-01T15:04:05Z. "
            "Only for an expiring secret."
        ),
    }
    reads_left = {"type": "integer", "maximum": MAX_READS}
    # The id a create answers with, carried into the body of a fetch or a delete: Swagger UI
    # shows these, and schemathesis's stateful run follows them through the lifecycle.
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
    create: dict[str, Any] = {
        **security,
        "summary": "Store a secret",
        "description": (
            "Encrypts the secret and returns the id that fetches it back. With `ttl_seconds` "
            "it expires that long after it is stored (the answer says when, in `expires_at`); "
            "with `max_reads` the fetch that uses the last read deletes it."
        ),
        "operationId": "createSecret",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/CreateRequest"}}
            },
        },
        "responses": {
            "200": {**_json("CreateResponse", "Stored."), "links": links},
            **common_errors,
            "400": _error(
                "The body is not a JSON object, `secret` is missing or not strict base64, or "
                "`ttl_seconds` or `max_reads` is not a JSON integer in its range (the detail "
                "names the field and the range)."
            ),
            "413": _error(
                f"The decoded secret exceeds {max_secret_bytes} bytes, "
                f"or the request body exceeds {max_body_bytes} bytes."
            ),
        },
    }
    not_found = _error(
        "No secret has this id: it never existed, expired, had its reads used up or was "
        "deleted (the same answer for all four)."
    )
    fetch: dict[str, Any] = {
        **security,
        "summary": "Fetch a secret",
        "description": (
            "Returns the secret stored under the id, with `reads_left` (the reads remaining "
            "after this one) for a read-limited secret and `expires_at` for an expiring one."
        ),
        "operationId": "fetchSecret",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/FetchRequest"}}
            },
        },
        "responses": {
            "200": _json("FetchResponse", "The secret."),
            "404": not_found,
            **common_errors,
        },
    }
    delete: dict[str, Any] = {
        **security,
        "summary": "Delete a secret",
        "description": (
            "Removes the secret stored under the id from the store (its ciphertext is gone, "
            "not flagged). The id travels in the body, never in the URL."
        ),
        "operationId": "deleteSecret",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/DeleteRequest"}}
            },
        },
        "responses": {
            "200": _json("DeleteResponse", "Deleted."),
            "404": not_found,
            **common_errors,
        },
    }

    def variant(operation: dict[str, Any], suffix: str) -> dict[str, Any]:
        return {**operation, "operationId": operation["operationId"] + suffix}

    paths: dict[str, Any] = {}
    if metrics:
        paths["/metrics"] = {
            "get": {
                **({"security": [{"metricsToken": []}]} if metrics_token else {}),
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **(
                        {
                            "401": _error(
                                "Missing or wrong METRICS_TOKEN (Authorization: Bearer <token>).",
                                challenge=True,
                            )
                        }
                        if metrics_token
                        else {}
                    ),
                },
            }
        }
    schemes = {
        **({"apiKey": {"type": "http", "scheme": "bearer"}} if api_keys else {}),
        **({"metricsToken": {"type": "http", "scheme": "bearer"}} if metrics_token else {}),
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "secret-manager",
            "version": __version__,
            "description": "Stores secrets encrypted with AES-256-GCM and hands them back by id.",
        },
        "paths": {
            "/vault/secret/create/": {"post": create},
            "/vault/secret/create": {"post": variant(create, "NoSlash")},
            "/vault/secret/fetch": {"post": fetch},
            "/vault/secret/fetch/": {"post": variant(fetch, "Slash")},
            "/vault/secret/delete": {"post": delete},
            "/vault/secret/delete/": {"post": variant(delete, "Slash")},
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "operationId": "healthz",
                    "responses": {"200": _json("Status", "The process is running.")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness",
                    "operationId": "readyz",
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
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": {
                        "200": {
                            "description": "The OpenAPI document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/docs": {
                "get": {
                    "summary": "Swagger UI for this document, served from packaged assets",
                    "operationId": "docs",
                    "responses": {
                        "200": {
                            "description": "The Swagger UI page.",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            **paths,
        },
        "components": {
            **({"securitySchemes": schemes} if schemes else {}),
            "schemas": {
                "CreateRequest": {
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
                },
                "CreateResponse": {
                    "type": "object",
                    "required": ["secret_id"],
                    "properties": {
                        "secret_id": {"type": "string", "format": "uuid"},
                        "expires_at": expires_at,
                        "reads_left": {
                            **reads_left,
                            "minimum": 1,
                            "description": "The reads allowed (max_reads); only when limited.",
                        },
                    },
                },
                "FetchRequest": {
                    "type": "object",
                    "required": ["secret_id"],
                    "properties": {
                        "secret_id": {"type": "string", "format": "uuid", "pattern": _UUID_PATTERN}
                    },
                },
                "FetchResponse": {
                    "type": "object",
                    "required": ["secret"],
                    "properties": {
                        "secret": {"type": "string", "format": "byte"},
                        "expires_at": expires_at,
                        "reads_left": {
                            **reads_left,
                            "minimum": 0,
                            "description": (
                                "Reads remaining after this one; only for a read-limited "
                                "secret (0: this was the last, and the secret is gone)."
                            ),
                        },
                    },
                },
                "DeleteRequest": {
                    "type": "object",
                    "required": ["secret_id"],
                    "properties": {
                        "secret_id": {"type": "string", "format": "uuid", "pattern": _UUID_PATTERN}
                    },
                },
                "DeleteResponse": {
                    "type": "object",
                    "required": ["secret_id", "deleted"],
                    "properties": {
                        "secret_id": {"type": "string", "format": "uuid"},
                        "deleted": {"type": "boolean", "enum": [True]},
                    },
                },
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
                "Error": {
                    "type": "object",
                    "required": ["detail"],
                    "properties": {
                        "detail": {
                            "type": "string",
                            "description": "What went wrong and what to do about it.",
                        }
                    },
                },
            },
        },
    }


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
