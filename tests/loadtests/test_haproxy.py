"""The harness's balancer: the shipped haproxy.cfg, run with only addresses and ports
substituted, finds the replicas through the run's DNS server and serves TLS.

Started here against addresses nothing listens on, so it runs in seconds without replicas;
the failover itself is exercised end to end in test_cluster.py.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import pytest

from loadtests.dns import DnsServer, answer
from loadtests.haproxy import EDGE_CONFIG, SOURCE_LIMITS, Balancer, stats_config
from loadtests.processes import ClusterError, free_port
from tests.conftest import ROOT, wait_until


@dataclass
class Backend:
    name: str
    host: str
    port: int


def query(name: str, qtype: int = 1, ident: int = 0x1234) -> bytes:
    """A DNS query for ``name`` as a resolver sends it (recursion desired)."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


def test_the_dns_answer_lists_every_address_for_the_name_only() -> None:
    reply = answer(
        query("Tasks.Secret-Manager"), "tasks.secret-manager", ["127.0.0.11", "127.0.0.12"]
    )
    ident, flags, _questions, answers = struct.unpack("!HHHH", reply[:8])
    assert (ident, answers, flags & 0x000F) == (0x1234, 2, 0)
    assert reply.endswith(
        socket.inet_aton("127.0.0.11")
        + struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4)
        + socket.inet_aton("127.0.0.12")
    )

    other = answer(query("elsewhere.test"), "tasks.secret-manager", ["127.0.0.11"])
    assert struct.unpack("!HHHH", other[:8])[1] & 0x000F == 3  # NXDOMAIN
    assert struct.unpack("!HHHH", other[:8])[3] == 0
    aaaa = answer(query("tasks.secret-manager", qtype=28), "tasks.secret-manager", ["127.0.0.11"])
    assert struct.unpack("!HHHH", aaaa[:8])[1] & 0x000F == 0  # the name exists, no IPv6
    assert struct.unpack("!HHHH", aaaa[:8])[3] == 0


def test_the_dns_server_answers_over_udp() -> None:
    server = DnsServer("tasks.secret-manager", ["127.0.0.11"])
    try:
        host, port = server.address.split(":")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.sendto(query("tasks.secret-manager"), (host, int(port)))
            reply, _ = sock.recvfrom(512)
        assert reply.endswith(socket.inet_aton("127.0.0.11"))
    finally:
        server.close()


def test_the_harness_runs_the_shipped_file_and_adds_only_a_statistics_page() -> None:
    assert EDGE_CONFIG == ROOT / "haproxy.cfg"
    extra = stats_config(8001)
    assert "    bind 127.0.0.1:8001\n" in extra
    lines = [line.split("#", 1)[0].strip() for line in extra.splitlines()]
    directives = [line for line in lines if line]
    # One section, a statistics frontend: nothing that carries or shapes the service's traffic.
    assert directives[0] == "frontend stats"
    assert {d.split()[0] for d in directives[1:]} == {"bind", "no", "stats"}


def test_the_harness_lifts_only_the_per_address_limits_and_they_exist() -> None:
    """All of a run's clients are 127.0.0.1; the variables it raises are the shipped file's
    (a renamed one would leave the run's own load refused, not raised)."""
    text = EDGE_CONFIG.read_text()
    assert set(SOURCE_LIMITS) == {"EDGE_SOURCE_MAXCONN", "EDGE_SOURCE_CONN_RATE"}
    for name in SOURCE_LIMITS:
        assert "${" + name + "-" in text, name


@pytest.mark.slow
def test_haproxy_runs_the_shipped_config_over_tls_and_reports_dead_backends_down(
    tmp_path: Path, haproxy: str
) -> None:
    port = free_port()  # nothing listens there
    backends = [Backend("r1", "127.0.0.11", port), Backend("r2", "127.0.0.12", port)]
    lb = Balancer(haproxy, backends, tmp_path)  # raises when `haproxy -c` refuses the config

    def states() -> dict[str, str]:
        try:
            return lb.server_states()
        except ClusterError:
            return {}  # its statistics page is not listening yet

    try:
        # Both resolved through the run's DNS server, then found dead by the health check.
        wait_until(lambda: states() == {"r1": "DOWN", "r2": "DOWN"}, 30, "both marked DOWN")
        assert set(lb.server_names().values()) == {"r1", "r2"}
        before = lb.frontend_requests()

        # An API path: the edge forwards nothing else (it answers /healthz 404 itself).
        response = httpx.post(lb.url + "/vault/secret/fetch", timeout=10, verify=lb.tls)

        assert lb.url.startswith("https://127.0.0.1:")
        assert response.status_code == 503  # no server left to take it
        assert lb.frontend_requests() == before + 1
    finally:
        lb.close()
    assert lb.config_path == EDGE_CONFIG
    # The run's key stays private to it.
    assert (tmp_path / "edge_tls.pem").stat().st_mode & 0o077 == 0
