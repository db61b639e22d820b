"""observability/logging.py: JSON lines with request and trace ids, and never a traceback."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer

from observability.logging import (
    CLIENT_REQUEST_ID,
    REQUEST_ID,
    JsonFormatter,
    install_trace_id_stamp,
)
from tests.conftest import ROOT, clean_env


@pytest.fixture
def tracer() -> Iterator[Tracer]:
    provider = TracerProvider()
    yield provider.get_tracer("test")
    provider.shutdown()


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines to a buffer, with the trace id stamp installed."""
    install_trace_id_stamp()
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.logging." + uuid.uuid4().hex)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, buffer
    logger.removeHandler(handler)


def parsed(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_lines_carry_the_callers_own_id_beside_the_request_id(
    lines: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = lines
    tokens = REQUEST_ID.set("server-1"), CLIENT_REQUEST_ID.set("mine-1")
    try:
        logger.info("in the request")
        logger.info("about this request", extra={"request_id": "server-1"})
        logger.info("about another request", extra={"request_id": "server-0"})
    finally:
        CLIENT_REQUEST_ID.reset(tokens[1])
        REQUEST_ID.reset(tokens[0])
    logger.info("outside any request")
    inside, same, other, outside = parsed(buffer)
    assert (inside["request_id"], inside["client_request_id"]) == ("server-1", "mine-1")
    assert (same["request_id"], same["client_request_id"]) == ("server-1", "mine-1")
    assert other["request_id"] == "server-0" and "client_request_id" not in other
    assert "request_id" not in outside and "client_request_id" not in outside


def test_lines_carry_request_id_and_trace_id_inside_a_span(
    lines: tuple[logging.Logger, io.StringIO], tracer: Tracer
) -> None:
    logger, buffer = lines
    token = REQUEST_ID.set("req-7")
    try:
        with tracer.start_as_current_span("POST /vault/secret") as span:
            logger.info("stored")
        logger.info("after the request span")
    finally:
        REQUEST_ID.reset(token)
    inside, outside = parsed(buffer)
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert inside["request_id"] == "req-7"
    assert inside["trace_id"] == trace_id
    assert len(trace_id) == 32 and int(trace_id, 16) != 0
    assert outside["request_id"] == "req-7"
    assert "trace_id" not in outside


def test_request_id_on_the_record_wins_over_the_context(
    lines: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = lines
    token = REQUEST_ID.set("from-context")
    try:
        logger.warning("store unavailable", extra={"request_id": "from-record"})
    finally:
        REQUEST_ID.reset(token)
    (line,) = parsed(buffer)
    assert line["request_id"] == "from-record"
    assert "trace_id" not in line


def test_trace_id_is_stamped_when_logged_not_when_formatted(
    caplog: pytest.LogCaptureFixture, tracer: Tracer
) -> None:
    install_trace_id_stamp()
    caplog.set_level(logging.INFO, logger="test.caplog")
    with tracer.start_as_current_span("request") as span:
        logging.getLogger("test.caplog").info("inside")
    (record,) = caplog.records
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert record.trace_id == trace_id  # type: ignore[attr-defined]
    # Formatted now, with no span current, the line still names the trace it was logged in.
    assert json.loads(JsonFormatter().format(record))["trace_id"] == trace_id


def test_exceptions_render_as_their_type_only(lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = lines
    secret = "s3cr3t-" + uuid.uuid4().hex
    try:
        raise ValueError(f"bad document {{'_id': {secret!r}}}")
    except ValueError:
        logger.exception("fetch failed")
    text = buffer.getvalue()
    (line,) = parsed(buffer)
    assert line["error_type"] == "ValueError"
    assert line["message"] == "fetch failed"
    assert secret not in text
    assert "Traceback" not in text
    assert "test_logging.py" not in text


def test_configure_logging_writes_trace_ids_to_stderr() -> None:
    code = """
        import logging
        from opentelemetry.sdk.trace import TracerProvider
        from observability.logging import configure_logging

        configure_logging("INFO")
        tracer = TracerProvider().get_tracer("t")
        with tracer.start_as_current_span("request") as span:
            print(format(span.get_span_context().trace_id, "032x"))
            logging.getLogger("secret_manager.app").info("inside")
        logging.getLogger("secret_manager.app").info("outside")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    inside, outside = (json.loads(line) for line in result.stderr.splitlines())
    assert inside["trace_id"] == result.stdout.strip()
    assert inside["logger"] == "secret_manager.app"
    assert "trace_id" not in outside
