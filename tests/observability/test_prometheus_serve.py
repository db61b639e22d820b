"""A real Prometheus scrapes a real ``secret-manager serve`` and reads a vault metric back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import ServerProcess, b64

pytestmark = pytest.mark.slow


def test_prometheus_scrapes_the_service(
    start_server: Callable[..., ServerProcess],
    start_prometheus: Callable[..., object],
    master_key: str,
    tmp_path: Path,
) -> None:
    server = start_server({"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")})
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(3):
            assert (
                client.post("/vault/secret/create", json={"secret": b64(b"x")}).status_code == 200
            )
    prometheus = start_prometheus([f"127.0.0.1:{server.port}"])
    prometheus.wait_for_value("vault_secrets_created_total", 3.0)  # type: ignore[attr-defined]
    targets = prometheus.targets()  # type: ignore[attr-defined]
    assert [t["health"] for t in targets] == ["up"]
    route = prometheus.query(  # type: ignore[attr-defined]
        'sum(http_requests_total{route="/vault/secret/create",status="200"})'
    )
    assert float(route[0]["value"][1]) == 3.0
