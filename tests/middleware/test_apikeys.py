"""middleware/apikeys.py on a tiny app that records which requests reach it, and as whom."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from middleware.apikeys import APIKey, APIKeyMiddleware, KeyTable, LiveKeys
from middleware.context import RequestContext, request_context
from vault.apikeys import parse_api_keys, parse_token, token_digest

ALICE = "alice-token-0123456789abcdefghijklmnopqrstuvwxyz"
BOB = "bob+token/0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ=="
CAROL = "carol.token~0123456789_abcdefghijklmnopqrstuvwx"
METRICS = "metrics-token-0123456789abcdefghijklmnopqrstuv"
KEYS_FILE = f"""\
# Keys of the services that may call the vault.
alice:{ALICE}

  bob : {BOB}
# carol:{CAROL} was retired
"""
CHALLENGE = 'Bearer realm="secret-manager"'
INVALID_CHALLENGE = 'Bearer realm="secret-manager", error="invalid_token"'


@dataclass
class Guarded:
    """An app behind APIKeyMiddleware, and the (path, key name) of each request it served."""

    app: Starlette
    reached: list[tuple[str, object]] = field(default_factory=list)

    def client(self) -> TestClient:
        return TestClient(self.app)


@pytest.fixture
def make_guarded() -> Callable[..., Guarded]:
    """``make_guarded(keys=..., metrics_token=None, **options)`` → a Guarded app."""

    def make(
        keys: dict[str, str] | None = None, metrics_token: str | None = None, **options: Any
    ) -> Guarded:
        keys = {"alice": ALICE, "bob": BOB} if keys is None else keys

        async def handle(request: Request) -> Response:
            name = request_context(request.scope).api_key_name
            guarded.reached.append((request.url.path, name))
            return JSONResponse({"ok": True})

        paths = ["/vault/secret/create/", "/vault", "/healthz", "/readyz", "/metrics", "/docs"]
        app = Starlette(
            routes=[Route(path, handle, methods=["GET", "POST"]) for path in paths],
            middleware=[
                Middleware(
                    APIKeyMiddleware,
                    keys={name: token_digest(token) for name, token in keys.items()},
                    metrics_token_digest=None
                    if metrics_token is None
                    else token_digest(metrics_token),
                    **options,
                )
            ],
        )
        guarded = Guarded(app)
        return guarded

    return make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_refused(response: httpx.Response, challenge: str = CHALLENGE) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == challenge
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["detail"], str)
    for token in (ALICE, BOB, CAROL, METRICS):
        assert token not in response.text


# --- the guard ---------------------------------------------------------------------------


def test_valid_token_reaches_the_app_with_the_key_name(
    make_guarded: Callable[..., Guarded],
) -> None:
    guarded = make_guarded()
    response = guarded.client().post("/vault/secret/create/", headers=bearer(ALICE))
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert guarded.reached == [("/vault/secret/create/", "alice")]


def test_every_key_is_accepted_under_its_own_name(make_guarded: Callable[..., Guarded]) -> None:
    guarded = make_guarded({"alice": ALICE, "bob": BOB, "carol": CAROL})
    client = guarded.client()
    statuses = [
        client.post("/vault/secret/create/", headers=bearer(token)).status_code
        for token in (CAROL, ALICE, BOB)
    ]
    assert statuses == [200, 200, 200]
    assert [name for _, name in guarded.reached] == ["carol", "alice", "bob"]


def test_scheme_is_case_insensitive(make_guarded: Callable[..., Guarded]) -> None:
    guarded = make_guarded()
    response = guarded.client().post(
        "/vault/secret/create/", headers={"Authorization": f"bearer  {BOB}"}
    )
    assert response.status_code == 200
    assert guarded.reached == [("/vault/secret/create/", "bob")]


def test_missing_header_is_refused_before_the_app(make_guarded: Callable[..., Guarded]) -> None:
    guarded = make_guarded()
    response = guarded.client().post("/vault/secret/create/", json={"secret": "aGk="})
    assert_refused(response)
    assert "Authorization: Bearer" in response.json()["detail"]
    assert guarded.reached == []


def test_a_refusal_with_an_unread_body_closes_its_connection(
    make_guarded: Callable[..., Guarded],
) -> None:
    """The server closes an HTTP/1.1 connection whose request body it did not read, so
    the refusal says so: a client sends its next request on a new connection instead of
    on one that is closing, where it would fail without an answer."""
    client = make_guarded().client()
    with_body = client.post("/vault/secret/create/", json={"secret": "aGk="})
    assert_refused(with_body)
    assert with_body.headers["connection"] == "close"
    without_body = client.get("/vault")  # nothing left unread: the connection is reused
    assert_refused(without_body)
    assert "connection" not in without_body.headers


@pytest.mark.parametrize(
    "token",
    [
        ALICE[:-1],  # a prefix of a real token
        ALICE + "x",
        ALICE.upper(),
        METRICS,  # another kind of token
        "x" * 40,
    ],
)
def test_wrong_token_is_refused_as_invalid(
    make_guarded: Callable[..., Guarded], token: str
) -> None:
    guarded = make_guarded(metrics_token=METRICS)
    response = guarded.client().post("/vault/secret/create/", headers=bearer(token))
    assert_refused(response, INVALID_CHALLENGE)
    assert response.json()["detail"] == "the token is not an API key this service knows; check it"
    assert guarded.reached == []


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", "")],
        [("Authorization", "Bearer")],
        [("Authorization", "Bearer   ")],
        [("Authorization", ALICE)],  # the token without a scheme
        [("Authorization", f"Basic {ALICE}")],
        [("Authorization", f"Token {ALICE}")],
        [("Authorization", f"Bearer{ALICE}")],
        # Two headers, even two good ones: which one would count is anyone's guess.
        [("Authorization", f"Bearer {ALICE}"), ("Authorization", f"Bearer {ALICE}")],
    ],
    ids=["empty", "scheme-only", "blank-token", "no-scheme", "basic", "token", "no-space", "twice"],
)
def test_malformed_header_is_refused(
    make_guarded: Callable[..., Guarded], headers: list[tuple[str, str]]
) -> None:
    guarded = make_guarded()
    response = guarded.client().post("/vault/secret/create/", headers=headers)
    assert_refused(response)
    assert "'Bearer <token>'" in response.json()["detail"]
    assert guarded.reached == []


def test_non_ascii_header_is_refused_not_an_error(make_guarded: Callable[..., Guarded]) -> None:
    guarded = make_guarded()
    response = guarded.client().post(
        "/vault/secret/create/", headers=[(b"Authorization", "Bearer ünïcødé-€".encode())]
    )
    assert_refused(response, INVALID_CHALLENGE)
    assert guarded.reached == []


def test_the_bare_prefix_is_guarded_too(make_guarded: Callable[..., Guarded]) -> None:
    guarded = make_guarded()
    assert_refused(guarded.client().get("/vault"))
    assert guarded.reached == []


def test_paths_outside_the_prefixes_are_open(make_guarded: Callable[..., Guarded]) -> None:
    guarded = make_guarded()
    client = guarded.client()
    assert client.get("/docs").status_code == 200
    assert client.get("/metrics").status_code == 200  # no metrics token configured
    assert guarded.reached == [("/docs", None), ("/metrics", None)]


def test_health_endpoints_stay_open_even_under_a_root_prefix(
    make_guarded: Callable[..., Guarded],
) -> None:
    guarded = make_guarded(protected_prefixes=("/",))
    client = guarded.client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz", headers=bearer("wrong" * 8)).status_code == 200
    assert_refused(client.get("/docs"))
    assert guarded.reached == [("/healthz", None), ("/readyz", None)]


def test_metrics_token_guards_metrics_only(make_guarded: Callable[..., Guarded]) -> None:
    guarded = make_guarded(metrics_token=METRICS)
    client = guarded.client()

    missing = client.get("/metrics")
    assert_refused(missing)
    assert "metrics token" in missing.json()["detail"]
    # An API key is not a metrics token, nor the other way round.
    wrong = client.get("/metrics", headers=bearer(ALICE))
    assert_refused(wrong, INVALID_CHALLENGE)
    assert wrong.json()["detail"] == "the token is not a metrics token this service knows; check it"
    assert_refused(client.post("/vault/secret/create/", headers=bearer(METRICS)), INVALID_CHALLENGE)
    assert guarded.reached == []

    assert client.get("/metrics", headers=bearer(METRICS)).status_code == 200
    # The scraper is not an API key: nothing is put in the state for the audit log.
    assert guarded.reached == [("/metrics", None)]


def test_metrics_token_alone_leaves_the_vault_open(make_guarded: Callable[..., Guarded]) -> None:
    guarded = make_guarded({}, metrics_token=METRICS, protected_prefixes=())
    client = guarded.client()
    assert client.post("/vault/secret/create/").status_code == 200
    assert_refused(client.get("/metrics"))
    assert client.get("/metrics", headers=bearer(METRICS)).status_code == 200


# --- the guard at the ASGI level ---------------------------------------------------------


async def run_raw(middleware: APIKeyMiddleware, scope: Scope) -> tuple[list[Message], list[Scope]]:
    """Call the middleware with a hand-made scope; what it sent, and what reached the app."""
    sent: list[Message] = []
    reached: list[Scope] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope)

    middleware.app = app
    await middleware(scope, receive, send)
    return sent, reached


def raw_scope(path: str, headers: list[tuple[bytes, bytes]], **extra: object) -> Scope:
    return {"type": "http", "method": "POST", "path": path, "headers": headers, **extra}


def guard() -> APIKeyMiddleware:
    return APIKeyMiddleware(
        JSONResponse({}), keys={"alice": token_digest(ALICE)}, metrics_token_digest=None
    )


@pytest.mark.anyio
async def test_bytes_that_are_not_text_get_401_not_500() -> None:
    sent, reached = await run_raw(
        guard(),
        raw_scope("/vault/secret/create/", [(b"authorization", b"Bearer \xff\xfe\x80\x00")]),
    )
    assert sent[0]["status"] == 401
    assert reached == []


@pytest.mark.anyio
async def test_root_path_does_not_hide_a_protected_path() -> None:
    # A server mounted under a root path puts it in front of the path the router sees.
    scope = raw_scope("/api/vault/secret/create/", [], root_path="/api")
    sent, reached = await run_raw(guard(), scope)
    assert sent[0]["status"] == 401
    assert reached == []


@pytest.mark.anyio
async def test_state_gets_the_name_and_other_scopes_pass_through() -> None:
    scope = raw_scope("/vault/secret/create/", [(b"authorization", f"Bearer {ALICE}".encode())])
    sent, reached = await run_raw(guard(), scope)
    assert sent == []
    assert request_context(reached[0]).api_key_name == "alice"

    sent, reached = await run_raw(guard(), {"type": "lifespan"})
    assert (sent, reached) == ([], [{"type": "lifespan"}])


@pytest.mark.anyio
async def test_the_context_gets_the_name_within_the_tenant_the_tenant_and_the_table() -> None:
    table = KeyTable.of_digests({"acme/billing": token_digest(ALICE), "ops": token_digest(BOB)})
    middleware = APIKeyMiddleware(JSONResponse({}), keys=table)
    for token, name, tenant in ((ALICE, "billing", "acme"), (BOB, "ops", "default")):
        scope = raw_scope("/vault/secret/fetch", [(b"authorization", f"Bearer {token}".encode())])
        sent, reached = await run_raw(middleware, scope)
        assert sent == []
        context = request_context(reached[0])
        assert (context.api_key_name, context.tenant) == (name, tenant)
        assert context.keys is table
        assert context.keys.names_in("acme") == {"billing"}


def test_every_key_is_compared_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # as apikeys sees it
    keys = {"alice": token_digest(ALICE), "bob": token_digest(BOB), "carol": token_digest(CAROL)}
    assert APIKeyMiddleware._match(ALICE.encode(), tuple(keys.items())) == "alice"
    assert compared == list(keys.values())


def test_only_digests_are_kept() -> None:
    keys = parse_api_keys(KEYS_FILE, source="API_KEYS_FILE")
    middleware = APIKeyMiddleware(
        JSONResponse({}),
        keys=keys,
        metrics_token_digest=parse_token(METRICS, source="METRICS_TOKEN"),
    )
    kept = repr(vars(middleware)) + repr(keys)
    for token in (ALICE, BOB, METRICS):
        assert token not in kept
        assert repr(token.encode()) not in kept
        assert repr(token.encode())[2:-1] not in kept
    assert keys == {"alice": hashlib.sha256(ALICE.encode()).digest(), "bob": token_digest(BOB)}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keys": {}}, "keys is empty"),
        ({"keys": {}, "protected_prefixes": ()}, "nothing to guard"),
        ({"keys": {"alice": ALICE.encode()}}, "SHA-256 digest"),  # a token, not its digest
        ({"keys": {"bad name": token_digest(ALICE)}}, "1-64 characters"),
        ({"keys": {"a": token_digest(ALICE), "b": token_digest(ALICE)}}, "same token"),
        ({"keys": {"a": token_digest(ALICE)}, "metrics_token_digest": b"short"}, "SHA-256"),
        ({"keys": {"a": token_digest(ALICE)}, "realm": 'a"b'}, "realm"),
        ({"keys": {"a": token_digest(ALICE)}, "protected_prefixes": ("vault/",)}, "start with"),
    ],
)
def test_constructor_refuses_what_would_guard_nothing_or_wrongly(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        APIKeyMiddleware(JSONResponse({}), **options)  # type: ignore[arg-type]


# --- scopes ------------------------------------------------------------------------------

OPERATIONS = {
    "/vault/secret/create": "create",
    "/vault/secret/create/": "create",
    "/vault/secret/fetch": "fetch",
    "/vault/secret/delete": "delete",
}
# One key per scope, and one with all of them.
SCOPED = KeyTable(
    (
        APIKey("creator", token_digest(ALICE), scopes=frozenset({"create"})),
        APIKey("fetcher", token_digest(BOB), "acme", frozenset({"fetch"})),
        APIKey("deleter", token_digest(CAROL), scopes=frozenset({"delete", "status"})),
        APIKey("admin", token_digest(METRICS), "acme"),
    )
)
TOKEN_OF = {"creator": ALICE, "fetcher": BOB, "deleter": CAROL, "admin": METRICS}


@dataclass
class Reached:
    """What the app behind the guard saw, and whether anyone read the request body."""

    contexts: list[RequestContext] = field(default_factory=list)
    body_reads: int = 0
    denied: list[str] = field(default_factory=list)


async def call(
    middleware: APIKeyMiddleware, reached: Reached, path: str, token: str
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One POST through the guard at the ASGI level: status, headers and JSON body sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        reached.body_reads += 1
        return {"type": "http.request", "body": b'{"secret_id": "x"}', "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.contexts.append(request_context(scope))
        await receive()
        await JSONResponse({"ok": True})(scope, receive, send)

    middleware.app = app
    scope = raw_scope(path, [(b"authorization", f"Bearer {token}".encode())])
    await middleware(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body)


def scoped_guard(reached: Reached, keys: KeyTable | LiveKeys = SCOPED) -> APIKeyMiddleware:
    return APIKeyMiddleware(
        JSONResponse({}), keys=keys, operations=OPERATIONS, on_denied=reached.denied.append
    )


@pytest.mark.anyio
@pytest.mark.parametrize("op", ["create", "fetch", "delete"])
@pytest.mark.parametrize("name", ["creator", "fetcher", "deleter", "admin"])
async def test_each_scope_is_allowed_and_refused_with_403_before_the_body(
    op: str, name: str
) -> None:
    reached = Reached()
    key = next(key for key in SCOPED if key.name == name)
    status, headers, body = await call(
        scoped_guard(reached), reached, f"/vault/secret/{op}", TOKEN_OF[name]
    )
    if op in key.scopes:
        assert (status, body) == (200, {"ok": True})
        assert reached.body_reads == 1
        assert reached.denied == []
        [context] = reached.contexts
        assert (context.api_key_name, context.tenant, context.op) == (name, key.tenant, op)
        assert context.keys is SCOPED
        return
    assert status == 403
    assert body == {
        "detail": f"this API key may not {op} secrets: send the token of a key whose scopes "
        f"include {op}, or ask the operator to give this key the {op} scope"
    }
    assert headers["content-type"] == "application/json"
    assert headers["www-authenticate"] == (
        f'Bearer realm="secret-manager", error="insufficient_scope", scope="{op}"'
    )
    assert (reached.contexts, reached.body_reads) == ([], 0)  # the app and the body untouched
    assert reached.denied == [op]
    for token in (ALICE, BOB, CAROL, METRICS):
        assert token not in json.dumps(body)


@pytest.mark.anyio
async def test_a_denied_request_tells_the_context_who_and_what_for_the_audit_log() -> None:
    reached = Reached()
    scope = raw_scope("/vault/secret/create/", [(b"authorization", f"Bearer {BOB}".encode())])
    sent, _ = await run_raw(scoped_guard(reached), scope)
    assert sent[0]["status"] == 403
    context = request_context(scope)
    assert (context.api_key_name, context.tenant, context.op) == ("fetcher", "acme", "create")
    assert context.keys is SCOPED


@pytest.mark.anyio
async def test_a_path_that_names_no_operation_needs_a_key_and_no_scope() -> None:
    reached = Reached()
    status, _, body = await call(scoped_guard(reached), reached, "/vault/secret/list", ALICE)
    assert (status, body) == (200, {"ok": True})
    [context] = reached.contexts
    assert (context.api_key_name, context.op) == ("creator", None)
    status, headers, _ = await call(scoped_guard(reached), reached, "/vault/secret/list", "x" * 40)
    assert status == 401
    assert headers["www-authenticate"] == INVALID_CHALLENGE


@pytest.mark.anyio
async def test_without_operations_every_key_may_call_every_path() -> None:
    reached = Reached()
    middleware = APIKeyMiddleware(JSONResponse({}), keys=SCOPED)
    for op in ("create", "fetch", "delete"):
        status, _, _ = await call(middleware, reached, f"/vault/secret/{op}", ALICE)
        assert status == 200


@pytest.mark.anyio
async def test_a_request_keeps_the_table_it_started_with_and_the_next_sees_the_new_one() -> None:
    live = LiveKeys(SCOPED)
    without_creator = KeyTable(tuple(key for key in SCOPED if key.name != "creator"))
    reached = Reached()
    middleware = scoped_guard(reached, live)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # The table is swapped while this request runs (a SIGHUP between two of its steps).
        live.replace(without_creator)
        reached.contexts.append(request_context(scope))
        await JSONResponse({"ok": True})(scope, receive, send)

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    middleware.app = app
    scope = raw_scope("/vault/secret/create", [(b"authorization", f"Bearer {ALICE}".encode())])
    await middleware(scope, receive, send)
    assert sent[0]["status"] == 200
    assert reached.contexts[0].keys is SCOPED
    assert reached.contexts[0].keys.names_in("default") == {"creator", "deleter"}
    assert live.table is without_creator

    status, _, _ = await call(middleware, reached, "/vault/secret/create", ALICE)
    assert status == 401
    status, _, _ = await call(middleware, reached, "/vault/secret/fetch", BOB)
    assert status == 200
    assert reached.contexts[-1].keys is without_creator


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            (APIKey("ci", token_digest(ALICE), "acme"), APIKey("ci", token_digest(BOB), "acme")),
            "two keys are named 'acme/ci'",
        ),
        ((APIKey("ci", token_digest(ALICE), "ac/me"),), "tenant 'ac/me' is not 1-64"),
        ((APIKey("ci", token_digest(ALICE), scopes=frozenset({"read"})),), "scopes must be"),
        ((APIKey("ci", token_digest(ALICE), scopes=frozenset()),), "scopes must be"),
    ],
)
def test_a_table_refuses_keys_it_could_not_tell_apart_or_use(
    keys: tuple[APIKey, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        KeyTable(keys)


def test_the_same_name_in_two_tenants_is_two_keys() -> None:
    table = KeyTable.of_digests({"acme/ci": token_digest(ALICE), "ci": token_digest(BOB)})
    assert [(key.tenant, key.name) for key in table] == [("acme", "ci"), ("default", "ci")]
    assert table.names_in("acme") == table.names_in("default") == {"ci"}
    assert table.match(BOB.encode()) == APIKey("ci", token_digest(BOB))
    assert table.match(CAROL.encode()) is None
    assert "digest" not in repr(table) and repr(token_digest(ALICE)) not in repr(table)


def test_an_operation_without_a_scope_is_refused() -> None:
    with pytest.raises(ValueError, match=r"operation 'list' of '/vault/list' has no scope"):
        APIKeyMiddleware(JSONResponse({}), keys=SCOPED, operations={"/vault/list": "list"})
