"""The tracer provider, set up from the standard ``OTEL_*`` variables, and store spans.

Spans never carry secret material, secret ids or bodies: the pymongo instrumentation is
told not to capture command documents (a fetch filter holds the secret id), a failed
command's status keeps only the error code name (a server message may quote a key), and a
store span carries the store system and operation name only.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import Context, ContextVar

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

log = logging.getLogger("secret_manager.tracing")

# The global provider can be set once per process; a second configure_tracing call (a
# second app built in the same process, tests) gets the first provider back.
_configured: tuple[TracerProvider, str, str] | None = None
_store_tracer: Tracer | None = None
SHUTDOWN_TIMEOUT_SECONDS = 2.0
# With tracing off a store call pays for one function call, not for a no-op span.
_NO_SPAN: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)


def configure_tracing(*, exporter: str, service_name: str) -> TracerProvider | None:
    """Install the global tracer provider and instrument pymongo; None for exporter "none".

    ``exporter`` is OTEL_TRACES_EXPORTER (otlp, console or none); the OTLP exporter reads
    OTEL_EXPORTER_OTLP_ENDPOINT and its other standard variables itself. Call it before any
    MongoClient is created: pymongo only reports commands to listeners registered earlier.
    """
    global _configured, _store_tracer
    if exporter == "none":
        return None
    if _configured is not None:
        provider, first_exporter, first_name = _configured
        if (first_exporter, first_name) != (exporter, service_name):
            log.warning(
                "tracing is already configured with exporter %s for %s; keeping it",
                first_exporter,
                first_name,
            )
        return provider

    # No atexit shutdown: shutdown_tracing does it, bounded in time (the SDK's own would
    # wait out the exporter's retries at exit).
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}), shutdown_on_exit=False
    )
    provider.add_span_processor(BatchSpanProcessor(_exporter(exporter)))
    trace.set_tracer_provider(provider)

    from opentelemetry.instrumentation.pymongo import PymongoInstrumentor

    PymongoInstrumentor().instrument(
        tracer_provider=provider, capture_statement=False, failed_hook=_scrub_failed_command
    )
    _configured = (provider, exporter, service_name)
    _store_tracer = provider.get_tracer("secret_manager.stores")
    return provider


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        # One compact JSON object per line on stdout; log lines go to stderr.
        return ConsoleSpanExporter(
            out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER must be otlp, console or none, got {name!r}")


def _scrub_failed_command(span: Span, event: object) -> None:
    """Replace the server's error message, which may quote a key, by its code name."""
    failure = getattr(event, "failure", None) or {}
    span.set_status(Status(StatusCode.ERROR, str(failure.get("codeName", "CommandFailed"))))


def shutdown_tracing(
    provider: TracerProvider | None, *, timeout: float = SHUTDOWN_TIMEOUT_SECONDS
) -> None:
    """Export the spans still queued and stop the exporter, within about ``timeout`` seconds.

    Tracing is best effort: with the collector unreachable, the OTLP exporter retries for
    up to its own timeout (10 s by default), which would hold the process's exit past a
    graceful stop. Whatever is not exported in time is dropped.
    """
    if provider is None:
        return

    def flush_and_stop() -> None:
        provider.force_flush()
        provider.shutdown()

    # The SDK's own timeouts do not bound an export that is retrying: a daemon thread does.
    stopping = threading.Thread(target=flush_and_stop, name="tracing-shutdown", daemon=True)
    stopping.start()
    stopping.join(timeout)


def store_span(
    operation: str, *, system: str, tracer_provider: TracerProvider | None = None
) -> AbstractContextManager[Span]:
    """A ``store.<operation>`` span with ``db.system`` and ``db.operation``, never an id.

    It uses the provider configure_tracing installed, or the one passed (tests), and is a
    no-op without either. A failure sets the status to ERROR with the exception type only:
    exception text can quote a document or a key.
    """
    tracer = _store_tracer if tracer_provider is None else tracer_provider.get_tracer(__name__)
    if tracer is None:
        return _NO_SPAN
    return _store_span(tracer, operation, system)


# Set by a group-commit batch for its database call: the contexts of every request it
# carries, the first being the one the call runs in (its span's parent).
BATCH_CONTEXTS: ContextVar[tuple[Context, ...]] = ContextVar("store_batch_contexts", default=())


def _batch_links() -> list[Link]:
    """Links to the requests a batched call carries besides its parent, when it is one."""
    links = []
    for context in BATCH_CONTEXTS.get()[1:]:
        span_context = context.run(trace.get_current_span).get_span_context()
        if span_context.is_valid:
            links.append(Link(span_context))
    return links


@contextmanager
def _store_span(tracer: Tracer, operation: str, system: str) -> Iterator[Span]:
    attributes: dict[str, str | int] = {"db.system": system, "db.operation": operation}
    if batch := BATCH_CONTEXTS.get():
        attributes["vault.batch_size"] = len(batch)
    with tracer.start_as_current_span(
        f"store.{operation}",
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        links=_batch_links(),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            if span.is_recording():
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
