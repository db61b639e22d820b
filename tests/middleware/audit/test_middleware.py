"""AuditMiddleware on a tiny app: every request recorded, nothing answered before it."""

from __future__ import annotations

import time

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from middleware.audit import AuditMiddleware, AuditRecord, AuditUnavailable
from middleware.context import request_context
from middleware.requestid import RequestIdMiddleware
from observability.audit import AuditWrite


class ListSink:
    """A sink that keeps records in a list, or refuses them all when ``broken``."""

    waits = True

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self.submitted: list[AuditRecord] = []
        self.spilled: list[AuditRecord] = []
        self.stored_beside: list[AuditRecord] = []
        self.refusals: list[Exception] = []
        self.broken = False

    async def write(self, record: AuditRecord) -> None:
        if self.broken:
            raise AuditUnavailable("down")
        self.records.append(record)

    def submit(self, record: AuditRecord) -> None:
        self.submitted.append(record)

    def spill(self, record: AuditRecord) -> None:
        self.spilled.append(record)

    def written_beside(self, record: AuditRecord) -> None:
        self.stored_beside.append(record)

    def refused(self, error: Exception) -> None:
        self.refusals.append(error)


async def noted(request: Request) -> Response:
    """A handler whose store writes the audit record with its own write (the store's part
    is played here: stamp the record for the answer, then say how the write went), then
    answers."""
    context = request_context(request.scope)
    context.op = "fetch"
    query = request.query_params
    noted_status, answered = int(query.get("noted", "200")), int(query.get("status", "200"))
    if context.audit is None:  # no sink waiting: the layer writes its own record
        return JSONResponse({"draft": False})
    record = context.audit.record(200).answered(noted_status)
    assert record.status == noted_status
    error = None if query.get("store") != "refuses" else ValueError("duplicate key")
    context.audit_written = AuditWrite(record, error)
    return JSONResponse({"secret": "c2VjcmV0"}, status_code=answered)


async def fetch(request: Request) -> Response:
    context = request_context(request.scope)
    context.op = "fetch"
    context.secret_id = (await request.json())["secret_id"]
    status = int(request.query_params.get("status", "200"))
    return JSONResponse({"secret": "c2VjcmV0"}, status_code=status)


async def other(request: Request) -> Response:
    return JSONResponse({"ok": True})


def make(sink: ListSink) -> TestClient:
    app = Starlette(
        routes=[
            Route("/fetch", fetch, methods=["POST"]),
            Route("/noted", noted, methods=["POST"]),
            Route("/other", other),
            Route("/api/status", other),
        ],
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(
                AuditMiddleware,
                sink=sink,
                operations={"/fetch": "fetch", "/noted": "fetch"},
                hash_secret_id=lambda secret_id: "hmac-of-" + secret_id[::-1],
                prefix="/api",
            ),
        ],
    )
    return TestClient(app)


def test_record_fields() -> None:
    sink = ListSink()
    client = make(sink)
    started = time.perf_counter()
    response = client.post(
        "/fetch?status=404",
        json={"secret_id": "abc-123"},
        headers={"User-Agent": "curl/8", "X-Request-ID": "rid-1"},
    )
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 404
    (record,) = sink.records
    assert record.op == "fetch"
    assert record.status == 404
    assert record.outcome == "not_found"
    assert record.client_ip == "testclient"
    # The server's own id, as the answer names it; the caller's is never the request's id.
    assert record.request_id == response.headers["x-server-request-id"] != "rid-1"
    assert record.secret_id_hmac == "hmac-of-321-cba"
    assert record.user_agent == "curl/8"
    # In milliseconds, of the time the request spent in the app: within what the client saw.
    assert 0 < record.latency_ms <= elapsed_ms
    assert record.ts.tzinfo is not None
    assert "abc-123" not in record.as_json()


def test_other_paths_are_not_audited() -> None:
    sink = ListSink()
    client = make(sink)
    assert client.get("/other").status_code == 200
    assert client.get("/apix").status_code == 404  # shares the prefix's letters, not its path
    assert sink.records == []


def test_every_path_under_the_prefix_is_audited_even_unknown_ones() -> None:
    sink = ListSink()
    client = make(sink)
    assert client.get("/api/status").status_code == 200
    assert client.post("/api/secret/other", json={}).status_code == 404
    assert client.get("/api").status_code == 404
    assert [(r.op, r.status, r.outcome) for r in sink.records] == [
        ("other", 200, "success"),
        ("other", 404, "not_found"),
        ("other", 404, "not_found"),
    ]


def test_rejected_before_the_handler_still_recorded_with_path_operation() -> None:
    sink = ListSink()
    assert make(sink).get("/fetch").status_code == 405  # handler never ran
    (record,) = sink.records
    assert record.op == "fetch"
    assert record.outcome == "invalid"  # the caller's mistake, not a failure of ours
    assert record.secret_id_hmac is None


def test_audit_failure_closes_the_door_with_503() -> None:
    sink = ListSink()
    sink.broken = True
    response = make(sink).post("/fetch", json={"secret_id": "abc"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"  # the middleware's default
    assert "secret" not in response.json()
    assert "audit" in response.json()["detail"]
    # What is recorded (or logged, when the store cannot take it) is what the caller got.
    assert sink.records == sink.submitted == []
    assert [(r.status, r.outcome) for r in sink.spilled] == [(503, "unavailable")]


def test_a_503_is_not_held_for_the_audit_write() -> None:
    sink = ListSink()
    sink.broken = True  # a waiting write would fail; a 503 must not wait for it
    response = make(sink).post("/fetch?status=503", json={"secret_id": "abc"})
    assert response.status_code == 503
    assert [r.status for r in sink.submitted] == [503]


def test_long_user_agent_is_truncated() -> None:
    sink = ListSink()
    make(sink).post("/fetch", json={"secret_id": "a"}, headers={"User-Agent": "x" * 5000})
    assert sink.records[0].user_agent == "x" * 256


def test_a_note_the_store_wrote_for_the_status_sent_is_not_written_again() -> None:
    sink = ListSink()
    response = make(sink).post("/noted", headers={"X-Request-ID": "rid-n"})
    assert response.status_code == 200
    assert sink.records == sink.submitted == sink.spilled == []  # no second write
    (record,) = sink.stored_beside  # counted (and echoed) as written
    assert (record.op, record.status, record.outcome, record.request_id) == (
        "fetch", 200, "success", response.headers["x-server-request-id"],
    )  # fmt: skip


def test_a_note_the_store_refused_fails_closed_with_503() -> None:
    sink = ListSink()
    response = make(sink).post("/noted?store=refuses")
    assert response.status_code == 503
    assert "secret" not in response.json()
    assert [type(e) for e in sink.refusals] == [ValueError]
    assert sink.records == sink.stored_beside == []
    assert [(r.status, r.outcome) for r in sink.spilled] == [(503, "unavailable")]


def test_an_answer_other_than_the_note_says_gets_its_own_record() -> None:
    # Should anything between the handler and this layer change the answer, the trail
    # still holds what the caller got.
    sink = ListSink()
    assert make(sink).post("/noted?noted=200&status=404").status_code == 404
    assert [(r.status, r.outcome) for r in sink.records] == [(404, "not_found")]


def test_without_a_waiting_sink_no_draft_is_offered() -> None:
    sink = ListSink()
    sink.waits = False  # async mode: records are queued, never handed to a store call
    assert make(sink).post("/fetch", json={"secret_id": "abc"}).status_code == 200
    assert len(sink.records) == 1
    assert make(sink).post("/noted").json() == {"draft": False}
    assert len(sink.records) == 2 and sink.stored_beside == []
