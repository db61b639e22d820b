"""Fixtures for observability tests: a real Prometheus server, and an ASGI app on loopback.

``start_prometheus(["127.0.0.1:PORT"])`` starts a Prometheus (the Debian package) that
scrapes the given targets every second; ``serve_asgi(app)`` serves an ASGI app with
Hypercorn in a thread of this process, so the test can change the metrics it serves.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.types import ASGIApp

from tests.conftest import HTTPProcess, free_port, wait_until


class PrometheusServer(HTTPProcess):
    """A ``prometheus`` process with its own config and storage, scraping given targets."""

    def __init__(
        self,
        directory: Path,
        targets: list[str],
        *,
        metrics_path: str = "/metrics",
        scrape_interval: str = "1s",
        job: str = "secret-manager",
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.job = job
        config = directory / "prometheus.yml"
        # JSON is YAML: no YAML library needed to write the config.
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": scrape_interval, "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": job,
                            "metrics_path": metrics_path,
                            "static_configs": [{"targets": targets}],
                        }
                    ],
                }
            )
        )
        super().__init__(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                "--web.listen-address=127.0.0.1:{port}",
            ],
            log=directory / "prometheus.log",
            probe="/-/ready",
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query: ``[{"metric": {...}, "value": [t, "v"]}]``."""
        response = httpx.get(f"{self.url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=5)
        body = response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for_value(self, expr: str, expected: float, timeout: float = 30) -> None:
        """Poll until the query yields exactly one series with this value."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            seen = self.query(expr)
            if len(seen) == 1 and float(seen[0]["value"][1]) == expected:
                return
            time.sleep(0.2)
        raise AssertionError(
            f"{expr} never became {expected} in {timeout}s; last result {seen}; "
            f"targets {self.targets()}"
        )

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health and last error."""
        body = httpx.get(self.url + "/api/v1/targets", timeout=5).json()
        return [
            {key: target.get(key) for key in ("scrapeUrl", "health", "lastError")}
            for target in body["data"]["activeTargets"]
        ]


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Start real Prometheus servers: ``start_prometheus(targets, **options)``.

    Each is stopped with SIGTERM at teardown; a non-zero exit fails the test.
    """
    servers: list[PrometheusServer] = []

    def start(targets: list[str], **options: Any) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(servers)}", targets, **options)
        servers.append(server)
        return server

    yield start
    codes = [server.stop() for server in servers]
    assert codes == [0] * len(servers), f"prometheus exit codes {codes}"


@pytest.fixture
def serve_asgi() -> Iterator[Callable[[ASGIApp], str]]:
    """Serve ASGI apps with Hypercorn on loopback, each in a thread: ``serve_asgi(app)`` → URL."""
    stops: list[tuple[threading.Thread, Callable[[], None]]] = []

    def start(app: ASGIApp) -> str:
        port = free_port()
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        started = threading.Event()
        state: dict[str, Any] = {}

        async def run() -> None:
            shutdown = asyncio.Event()
            state["stop"] = shutdown.set
            state["loop"] = asyncio.get_running_loop()
            started.set()
            await serve(app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]

        thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
        thread.start()
        assert started.wait(10), "the Hypercorn thread did not start"
        stops.append((thread, lambda: state["loop"].call_soon_threadsafe(state["stop"])))
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                httpx.get(url + "/", timeout=1)
                return True
            except httpx.HTTPError:
                return False

        wait_until(answers, 10, f"Hypercorn on {url}")
        return url

    yield start
    for thread, stop in stops:
        stop()
        thread.join(10)
        assert not thread.is_alive(), "Hypercorn did not shut down"
