"""The edge's HAProxy configuration (haproxy.cfg), the same file stack.yml ships.

HAProxy validates it (``haproxy -c``) with a throwaway certificate, and a smoke run starts
it in front of a real ``secret-manager serve``, with only the addresses and ports its
environment variables name substituted: TLS answers, and a client's own X-Forwarded-For is
replaced by the address the edge saw.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from loadtests.processes import free_port
from tests.conftest import ROOT, ServerProcess, wait_until
from tests.deploy.test_deploy import tool

CONFIG = ROOT / "haproxy.cfg"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """(certificate, certificate + key in one PEM as HAProxy reads it) for localhost."""
    cert, key, pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "edge_tls.pem"
    command = (
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost"
        f" -addext subjectAltName=DNS:localhost -keyout {key} -out {cert}"
    )
    result = subprocess.run(
        [tool("openssl"), *command.split()],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pem.write_text(cert.read_text() + key.read_text())
    return cert, pem


def haproxy_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("haproxy"), "-c", "-f", str(CONFIG)],
        env={"PATH": "/usr/sbin:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_haproxy_accepts_the_shipped_configuration(certificate: tuple[Path, Path]) -> None:
    """With the Swarm defaults for everything but the certificate's path, no warning."""
    result = haproxy_check({"EDGE_TLS_PEM": str(certificate[1])})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


def test_haproxy_refuses_the_configuration_without_its_certificate(tmp_path: Path) -> None:
    """The check above is a real one: a missing certificate fails it."""
    result = haproxy_check({"EDGE_TLS_PEM": str(tmp_path / "absent.pem")})
    assert result.returncode != 0


def directives() -> list[str]:
    """haproxy.cfg's lines without comments or surrounding blanks."""
    lines = (line.split("#", 1)[0].strip() for line in CONFIG.read_text().splitlines())
    return [line for line in lines if line]


def test_the_configuration_keeps_the_edges_promises() -> None:
    lines = directives()
    # The client's address overwrites whatever it sent; nothing appends to its header.
    assert "http-request set-header X-Forwarded-For %[src]" in lines
    assert not any("forwardfor" in line for line in lines)
    assert not any(re.search(r"x-request-id", line, re.I) for line in lines)  # passed as is
    assert any("ssl-min-ver TLSv1.2" in line for line in lines)
    (bind,) = [line for line in lines if line.startswith("bind") and " ssl " in line]
    assert 'crt "${EDGE_TLS_PEM-/run/secrets/edge_tls.pem}"' in bind
    assert bind.endswith("alpn h2,http/1.1")
    assert "http-request redirect scheme https code 308" in lines
    assert "option httpchk GET /readyz" in lines
    (template,) = [line for line in lines if line.startswith("server-template")]
    assert "${EDGE_BACKEND-tasks.secret-manager:8000}" in template
    (default_server,) = [line for line in lines if line.startswith("default-server")]
    assert "resolvers docker" in default_server
    assert 'nameserver dns1 "${EDGE_DNS-127.0.0.11:53}"' in lines
    assert "http-request use-service prometheus-exporter if { path /metrics }" in lines


@contextlib.contextmanager
def edge(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy running the shipped configuration with ``env``, stopped on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [tool("haproxy"), "-f", str(CONFIG)],
            env={"PATH": "/usr/sbin:/usr/bin:/bin", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def alpn_choice(port: int, cafile: Path) -> str | None:
    """The protocol the edge picks when a client offers HTTP/2 and HTTP/1.1."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.selected_alpn_protocol()


def test_the_edge_terminates_tls_and_overwrites_the_clients_forwarded_for(
    start_server: Any, master_key: str, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    """A client on 127.0.0.2 claiming to be 203.0.113.9 is audited as 127.0.0.2."""
    server: ServerProcess = start_server(
        {
            "MASTER_KEY": master_key,
            "TRUSTED_PROXIES": "127.0.0.1/32",  # the edge connects from 127.0.0.1
            "AUDIT_STDOUT": "true",
            "DATA_DIR": str(tmp_path / "data"),
        }
    )
    https_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        "EDGE_TLS_PEM": str(certificate[1]),
        "EDGE_HTTPS_BIND": f"127.0.0.1:{https_port}",
        "EDGE_HTTP_BIND": f"127.0.0.1:{http_port}",
        "EDGE_METRICS_BIND": f"127.0.0.1:{metrics_port}",
        "EDGE_BACKEND": f"127.0.0.1:{server.port}",
        "EDGE_BACKEND_SLOTS": "1",
    }
    context = ssl.create_default_context(cafile=str(certificate[0]))
    transport = httpx.HTTPTransport(verify=context, local_address="127.0.0.2")
    url = f"https://localhost:{https_port}"
    with (
        edge(env, tmp_path / "haproxy.log") as process,
        httpx.Client(transport=transport, timeout=5) as client,
    ):

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "haproxy.log").read_text()
            try:
                return client.get(url + "/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        # The backend answers once its first health check passed (every 2 s).
        wait_until(ready, 30, "the edge to answer /readyz")
        request_id = f"edge-{uuid.uuid4().hex}"
        answer = client.post(
            url + "/vault/secret/fetch",
            json={"secret_id": str(uuid.uuid4())},
            headers={"X-Forwarded-For": "203.0.113.9", "X-Request-ID": request_id},
        )
        assert answer.status_code == 404
        assert answer.headers["X-Request-ID"] == request_id  # passed through the edge
        server_request_id = answer.headers["X-Server-Request-ID"]  # the audit record's
        # Plain HTTP is redirected, never forwarded.
        plain = httpx.get(f"http://localhost:{http_port}/readyz", timeout=5)
        assert (plain.status_code, plain.headers["Location"]) == (
            308,
            f"https://localhost:{http_port}/readyz",
        )
        assert alpn_choice(https_port, certificate[0]) == "h2"
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'haproxy_backend_active_servers{proxy="secret-manager"} 1' in metrics
    assert server.stop() == 0
    records = [
        json.loads(line)
        for line in server.output().splitlines()
        if line.startswith("{") and server_request_id in line
    ]
    assert [record["client_ip"] for record in records if "op" in record] == ["127.0.0.2"]
