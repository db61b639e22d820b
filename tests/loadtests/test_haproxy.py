"""The harness's balancer: the configuration it writes is one HAProxy accepts and runs.

Started here against ports nothing listens on, so it runs in seconds without replicas; the
failover itself is exercised end to end in test_cluster.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import pytest

from loadtests.haproxy import Balancer, haproxy_config
from loadtests.processes import ClusterError, free_port
from tests.conftest import wait_until


@dataclass
class Backend:
    name: str
    port: int


def test_the_config_lists_every_backend_in_order() -> None:
    config = haproxy_config(8000, 8001, [Backend("r1", 9001), Backend("r2", 9002)])

    assert "    bind 127.0.0.1:8000\n" in config
    assert "    bind 127.0.0.1:8001\n" in config
    assert config.index("server r1 127.0.0.1:9001\n") < config.index("server r2 127.0.0.1:9002\n")


@pytest.mark.slow
def test_haproxy_runs_the_config_and_reports_dead_backends_down(
    tmp_path: Path, haproxy: str
) -> None:
    backends = [Backend("r1", free_port()), Backend("r2", free_port())]  # nothing listens
    lb = Balancer(haproxy, backends, tmp_path)  # raises when `haproxy -c` refuses the config

    def states() -> dict[str, str]:
        try:
            return lb.server_states()
        except ClusterError:
            return {}  # its statistics page is not listening yet

    try:
        wait_until(lambda: states() == {"r1": "DOWN", "r2": "DOWN"}, 10, "both marked DOWN")
        before = lb.frontend_requests()

        response = httpx.get(lb.url + "/healthz", timeout=10)

        assert response.status_code == 503  # no server left to take it
        assert lb.frontend_requests() == before + 1
    finally:
        lb.close()
    assert (tmp_path / "haproxy.cfg").read_text() == haproxy_config(
        lb.port, lb.stats_port, backends
    )
