"""observability/metrics.py: a valid exposition, summed across worker processes, scraped
by a real Prometheus."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import ASGIApp

from middleware.context import request_context
from middleware.metrics import PrometheusMiddleware
from observability.metrics import (
    AUDIT_RECORDS,
    RATE_LIMITED,
    SECRETS_CREATED,
    STORE_BATCH_SIZE,
    metrics_app,
    observe_store_operation,
    prepare_multiprocess_dir,
)
from tests.conftest import ROOT, clean_env
from tests.observability.conftest import PrometheusServer

FAMILIES = (
    "http_requests",
    "http_request_duration_seconds",
    "http_requests_in_progress",
    "vault_secrets_created",
    "vault_secrets_fetched",
    "vault_rate_limited",
    "vault_audit_records",
    "vault_store_batch_size",
    "vault_store_operation_seconds",
)


async def item(request: Request) -> Response:
    return JSONResponse({"item": request.path_params["item_id"]})


async def fetch(request: Request) -> Response:
    request_context(request.scope).op = "fetch"
    return JSONResponse({"detail": "no secret has this secret_id"}, status_code=404)


def service(multiprocess_dir: Path | None = None) -> Starlette:
    """A tiny service: two routes behind the metrics middleware, and /metrics."""
    return Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Route("/fetch", fetch, methods=["POST"]),
            Route("/metrics", metrics_app(multiprocess_dir=multiprocess_dir)),
        ],
        middleware=[Middleware(PrometheusMiddleware)],
    )


def promtool_check(exposition: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
    )


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, keyed by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def sample(exposition: str, name: str, **labels: str) -> float | None:
    return samples(exposition).get((name, frozenset(labels.items())))


def test_exposition_after_traffic_passes_promtool() -> None:
    with TestClient(service()) as client:
        client.get("/items/1")
        client.get("/nope")
        client.post("/fetch")
        RATE_LIMITED.inc()
        AUDIT_RECORDS.labels("written").inc(3)
        AUDIT_RECORDS.labels("failed").inc()
        STORE_BATCH_SIZE.labels("insert_audit").observe(3)
        observe_store_operation("insert", 0.004)
        exposition = client.get("/metrics").text

    families = {family.name for family in text_string_to_metric_families(exposition)}
    assert set(FAMILIES) <= families
    checked = promtool_check(exposition)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""


def test_store_operations_are_timed_by_operation() -> None:
    def read(name: str, **extra: str) -> float:
        return REGISTRY.get_sample_value(name, {"operation": "get", **extra}) or 0.0

    count = read("vault_store_operation_seconds_count")
    under_2_5_ms = read("vault_store_operation_seconds_bucket", le="0.0025")
    under_5_ms = read("vault_store_operation_seconds_bucket", le="0.005")

    observe_store_operation("get", 0.003)

    assert read("vault_store_operation_seconds_count") == count + 1
    assert read("vault_store_operation_seconds_bucket", le="0.0025") == under_2_5_ms
    assert read("vault_store_operation_seconds_bucket", le="0.005") == under_5_ms + 1


def worker(directory: Path, *args: str) -> subprocess.Popen[str]:
    """One stand-in worker process with PROMETHEUS_MULTIPROC_DIR set before any import."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.observability.multiprocess_worker", *args],
        cwd=ROOT,
        env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(directory)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out


def scrape(directory: Path) -> str:
    return finish(worker(directory, "scrape", str(directory)))


@pytest.mark.slow
def test_values_of_every_worker_process_are_summed(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus-multiproc"
    prepare_multiprocess_dir(directory)

    workers = [worker(directory, "record", "3"), worker(directory, "record", "4")]
    for process in workers:
        finish(process)
    exposition = scrape(directory)

    assert sample(exposition, "vault_secrets_created_total") == 7
    batches = {"operation": "insert_audit"}
    assert sample(exposition, "vault_store_batch_size_count", **batches) == 2
    assert sample(exposition, "vault_store_batch_size_sum", **batches) == 7
    assert sample(exposition, "vault_store_batch_size_bucket", le="2.0", **batches) == 0
    assert sample(exposition, "vault_store_batch_size_bucket", le="4.0", **batches) == 2
    checked = promtool_check(exposition)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.slow
def test_prepare_deletes_values_left_by_an_earlier_run(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus-multiproc"
    prepare_multiprocess_dir(directory)
    finish(worker(directory, "record", "5"))
    assert sample(scrape(directory), "vault_secrets_created_total") == 5

    prepare_multiprocess_dir(directory)

    assert list(directory.glob("*.db")) == []
    finish(worker(directory, "record", "2"))
    assert sample(scrape(directory), "vault_secrets_created_total") == 2


@pytest.mark.slow
def test_prepare_keeps_the_files_its_own_process_is_writing(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus-multiproc"
    prepare_multiprocess_dir(directory)
    finish(worker(directory, "record", "5"))  # an earlier run's worker

    finish(worker(directory, "keep-own-files", "3", str(directory)))

    assert sample(scrape(directory), "vault_secrets_created_total") == 3 + 1


def test_prepare_creates_a_private_directory(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "prometheus"

    prepare_multiprocess_dir(directory)

    assert directory.is_dir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def metrics_server(serve_asgi: Callable[[ASGIApp], str]) -> str:
    """host:port of a real HTTP server (Hypercorn) serving ``service()`` in this process."""
    url = serve_asgi(service())
    assert httpx.get(url + "/metrics", timeout=5).status_code == 200
    return url.removeprefix("http://")


@pytest.mark.slow
def test_real_prometheus_scrapes_the_vault_counters(
    start_prometheus: Callable[..., PrometheusServer], serve_asgi: Callable[[ASGIApp], str]
) -> None:
    target = metrics_server(serve_asgi)
    prometheus = start_prometheus([target])
    before = REGISTRY.get_sample_value("vault_secrets_created_total")
    assert before is not None
    prometheus.wait_for_value("vault_secrets_created_total", before)

    SECRETS_CREATED.inc(3)

    prometheus.wait_for_value("vault_secrets_created_total", before + 3)
    assert [t["health"] for t in prometheus.targets()] == ["up"]
    up = prometheus.query('up{job="secret-manager"}')
    assert [float(series["value"][1]) for series in up] == [1.0]
