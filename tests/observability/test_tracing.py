"""observability/tracing.py: the provider from OTEL_* settings, store spans, pymongo spans.

The global tracer provider can be set once per process, so configure_tracing runs in
subprocesses here; in-process tests hand store_span a provider of their own.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from observability.tracing import store_span
from tests.conftest import ROOT, clean_env
from vault.stores.batching import Batcher


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def otel_free_env(**extra: str) -> dict[str, str]:
    """The environment without any OTEL_* setting from the developer's shell, plus extra."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run code in a fresh interpreter at the repository root; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env=env or otel_free_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_store_span_is_named_for_the_operation_and_carries_no_id(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = provider
    parent = tracer_provider.get_tracer("test").start_as_current_span("POST /vault/secret")
    with (
        parent as request_span,
        store_span("insert", system="sqlite", tracer_provider=tracer_provider),
    ):
        pass
    (span, _) = exporter.get_finished_spans()
    assert span.name == "store.insert"
    assert span.kind is SpanKind.INTERNAL
    assert dict(span.attributes or {}) == {"db.system": "sqlite", "db.operation": "insert"}
    assert span.parent is not None
    assert span.parent.span_id == request_span.get_span_context().span_id


def test_store_span_failure_keeps_the_type_and_drops_the_message(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = provider
    secret_id = "sid-" + uuid.uuid4().hex
    with (
        pytest.raises(KeyError, match=secret_id),
        store_span("get", system="mongodb", tracer_provider=tracer_provider),
    ):
        raise KeyError(secret_id)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "KeyError"
    assert span.attributes is not None and span.attributes["error.type"] == "KeyError"
    assert span.events == ()
    assert secret_id not in span.to_json()


def test_configure_tracing_none_installs_nothing_and_store_span_is_a_no_op() -> None:
    out = run_python(
        """
        from opentelemetry import trace
        from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
        from observability.tracing import configure_tracing, store_span

        assert configure_tracing(exporter="none", service_name="secret-manager") is None
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        assert not PymongoInstrumentor().is_instrumented_by_opentelemetry
        try:
            with store_span("get", system="sqlite") as span:
                assert not span.is_recording()
                raise LookupError
        except LookupError:
            print("raised through")
        """
    )
    assert out == "raised through\n"


CONSOLE_SCRIPT = """
    import sys
    import pymongo
    from observability.tracing import configure_tracing, shutdown_tracing, store_span

    uri, db, secret_id = sys.argv[1:]
    provider = configure_tracing(exporter="console", service_name="secret-manager")
    assert configure_tracing(exporter="console", service_name="other") is provider
    client = pymongo.MongoClient(uri)  # after configure_tracing, so its commands are seen
    secrets = client[db]["secrets"]
    with store_span("insert", system="mongodb"):
        secrets.insert_one({"_id": secret_id, "ct": b"sealed"})
    with store_span("get", system="mongodb"):
        assert secrets.find_one({"_id": secret_id}) is not None
    try:
        # A server error message quotes the query: here the secret id, as an operator.
        secrets.find_one({"_id": {"$" + secret_id: 1}})
    except pymongo.errors.OperationFailure as exc:
        assert secret_id in str(exc)
    else:
        raise AssertionError("the server accepted an unknown operator")
    client.close()
    shutdown_tracing(provider)
"""


def test_console_exporter_prints_store_and_pymongo_spans_without_the_secret_id(
    mongo_uri: str,
) -> None:
    secret_id = "sid-" + uuid.uuid4().hex
    db = "t" + uuid.uuid4().hex[:16]
    out = run_python(CONSOLE_SCRIPT, mongo_uri, db, secret_id)
    spans = [json.loads(line) for line in out.splitlines()]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {"secret-manager"}

    (store_get,) = by_name["store.get"]
    (find, failed_find) = by_name[f"{db}.find"]
    assert find["parent_id"] == store_get["context"]["span_id"]
    assert find["kind"] == "SpanKind.CLIENT"
    assert find["attributes"]["db.system"] == "mongodb"
    assert find["attributes"]["db.statement"] == "find"  # the command name, not the filter
    assert find["attributes"]["db.mongodb.collection"] == "secrets"
    (insert,) = by_name[f"{db}.insert"]
    assert insert["parent_id"] == by_name["store.insert"][0]["context"]["span_id"]
    assert failed_find["status"]["status_code"] == "ERROR"
    assert secret_id not in out


class _Collector(BaseHTTPRequestHandler):
    requests: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.requests.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_otlp_exporter_sends_to_the_standard_endpoint_variable() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    _Collector.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        run_python(
            """
            from opentelemetry import trace
            from observability.tracing import configure_tracing, shutdown_tracing

            provider = configure_tracing(exporter="otlp", service_name="vault-eu")
            with trace.get_tracer("t").start_as_current_span("hello-collector"):
                pass
            shutdown_tracing(provider)
            """,
            env=otel_free_env(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint),
        )
    finally:
        server.shutdown()
        server.server_close()
    ((path, body),) = _Collector.requests
    assert path == "/v1/traces"
    assert b"hello-collector" in body
    assert b"vault-eu" in body


def test_an_unreachable_collector_does_not_hold_up_the_exit() -> None:
    started = time.monotonic()
    run_python(
        """
        from opentelemetry import trace
        from observability.tracing import configure_tracing, shutdown_tracing

        provider = configure_tracing(exporter="otlp", service_name="vault-eu")
        with trace.get_tracer("t").start_as_current_span("nobody-listens"):
            pass
        shutdown_tracing(provider)
        """,
        env=otel_free_env(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9"),  # nothing there
    )
    assert time.monotonic() - started < 6  # an interpreter start, and at most 2 s of export


def test_a_batched_store_call_is_its_first_requests_child_and_links_the_others(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = provider
    tracer = tracer_provider.get_tracer("test")

    async def call(items: list[int]) -> list[int | Exception]:
        with store_span("insert", system="test", tracer_provider=tracer_provider):
            await asyncio.sleep(0.01)
        return list(items)

    async def main() -> dict[int, int]:
        batcher = Batcher(call, operation="test")
        span_ids: dict[int, int] = {}

        async def request(n: int) -> None:
            with tracer.start_as_current_span(f"request {n}") as span:
                span_ids[n] = span.get_span_context().span_id
                await batcher.submit(n)

        first = asyncio.ensure_future(request(0))
        await asyncio.sleep(0)  # request 0's call is out; 1 and 2 share the next one
        await asyncio.gather(first, request(1), request(2))
        return span_ids

    span_ids = asyncio.run(main())
    calls = [span for span in exporter.get_finished_spans() if span.name == "store.insert"]
    assert len(calls) == 2
    alone, shared = calls
    assert alone.parent is not None and alone.parent.span_id == span_ids[0]
    assert alone.links == () and alone.attributes["vault.batch_size"] == 1  # type: ignore[index]
    assert shared.parent is not None and shared.parent.span_id == span_ids[1]
    assert [link.context.span_id for link in shared.links] == [span_ids[2]]
    assert shared.attributes["vault.batch_size"] == 2  # type: ignore[index]
