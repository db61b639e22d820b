"""The edge's HAProxy configuration (haproxy.cfg), the same file stack.yml ships.

HAProxy validates it (``haproxy -c``) with a throwaway certificate, and test runs start it in
front of a real ``secret-manager serve``, with only what its ``EDGE_*`` environment variables
name substituted (addresses, ports, and small limits where a test needs them): TLS answers,
a client's own X-Forwarded-For is replaced by the address the edge saw, only the API's paths
are forwarded, every HTTPS answer carries HSTS, plain HTTP is sent to the public host, and a
client that floods or idles is cut off. Clients bind their source to 127.0.0.2, 127.0.0.3,
... so that the edge counts them apart.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from loadtests.processes import free_port
from tests.conftest import ROOT, ServerProcess, b64, wait_until
from tests.deploy.test_deploy import tool
from vault.crypto import generate_key

CONFIG = ROOT / "haproxy.cfg"
HSTS = "max-age=31536000"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, certificate + key in one PEM as HAProxy reads it) for localhost."""
    directory = tmp_path_factory.mktemp("edge-tls")
    cert, key, pem = directory / "cert.pem", directory / "key.pem", directory / "edge_tls.pem"
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


@pytest.mark.parametrize("value", ["off", "on"])
def test_the_docs_switch_is_on_or_off(certificate: tuple[Path, Path], value: str) -> None:
    result = haproxy_check({"EDGE_TLS_PEM": str(certificate[1]), "EDGE_PUBLIC_DOCS": value})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("value", ["false", "yes", "", "ON"])
def test_a_docs_switch_that_is_neither_is_refused_at_start(
    certificate: tuple[Path, Path], value: str
) -> None:
    """A typo does not silently publish the docs, nor silently hide them: HAProxy will not
    start, and says which variable to fix."""
    result = haproxy_check({"EDGE_TLS_PEM": str(certificate[1]), "EDGE_PUBLIC_DOCS": value})
    assert result.returncode != 0
    assert "EDGE_PUBLIC_DOCS must be on or off" in result.stdout + result.stderr


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
    # To the configured public host, never to the Host the client named.
    assert 'http-request redirect prefix "https://${EDGE_PUBLIC_HOST-localhost}" code 308' in lines
    assert not any("redirect scheme" in line for line in lines)
    assert "option httpchk GET /readyz" in lines
    (template,) = [line for line in lines if line.startswith("server-template")]
    assert "${EDGE_BACKEND-tasks.secret-manager:8000}" in template
    (default_server,) = [line for line in lines if line.startswith("default-server")]
    assert "resolvers docker" in default_server
    assert 'nameserver dns1 "${EDGE_DNS-127.0.0.11:53}"' in lines
    assert "http-request use-service prometheus-exporter if { path /metrics }" in lines


def test_the_swarm_defaults_are_the_documented_limits() -> None:
    """The numbers docs/edge.md derives from the 256 MiB memory limit, and short deadlines.
    Every frontend has its own ceiling, and together they stay within the global one."""
    lines = directives()
    assert 'maxconn "${EDGE_MAXCONN-3000}"' in lines
    frontends: dict[str, int] = {}
    section = ""
    for line in lines:
        if line.split()[0] in ("global", "defaults", "frontend", "backend", "resolvers"):
            section = line
        elif line.startswith("maxconn") and section.startswith("frontend"):
            # `maxconn 180`, or `maxconn "${EDGE_HTTPS_MAXCONN-2800}"`: the default's digits.
            frontends[section.split()[1]] = int(re.sub(r"\D", "", line.rsplit("-", 1)[-1]))
    assert frontends == {"http": 180, "https": 2800, "metrics": 20}
    assert sum(frontends.values()) <= 3000
    assert 'timeout client "${EDGE_CLIENT_TIMEOUT-5s}"' in lines
    assert 'timeout http-request "${EDGE_REQUEST_TIMEOUT-5s}"' in lines
    for limit in (
        'sc0_conn_cur gt "${EDGE_SOURCE_MAXCONN-100}"',
        'sc0_conn_rate gt "${EDGE_SOURCE_CONN_RATE-300}"',
    ):
        # On both ports, which share one table: an address's connections are counted together.
        assert lines.count(f"tcp-request connection reject if {{ {limit} }}") == 2, limit


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


def answered_by_a_replica(client: httpx.Client, url: str) -> bool:
    """Whether an API call through the edge reached secret-manager (which names the replica
    in X-Served-By), rather than the edge answering for want of one."""
    try:
        answer = client.post(url + "/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
    except httpx.HTTPError:
        return False
    return answer.status_code == 404 and "X-Served-By" in answer.headers


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
            return answered_by_a_replica(client, url)

        # The backend answers once its first health check passed (every 2 s).
        wait_until(ready, 30, "the edge to forward an API call")
        request_id = f"edge-{uuid.uuid4().hex}"
        answer = client.post(
            url + "/vault/secret/fetch",
            json={"secret_id": str(uuid.uuid4())},
            headers={"X-Forwarded-For": "203.0.113.9", "X-Request-ID": request_id},
        )
        assert answer.status_code == 404
        assert answer.headers["X-Request-ID"] == request_id  # passed through the edge
        server_request_id = answer.headers["X-Server-Request-ID"]  # the audit record's
        # Plain HTTP is redirected, never forwarded: to the public host (EDGE_PUBLIC_HOST,
        # localhost by default) on the HTTPS port, not to the plain port it came in on.
        plain = httpx.get(f"http://localhost:{http_port}/readyz", timeout=5)
        assert (plain.status_code, plain.headers["Location"]) == (308, "https://localhost/readyz")
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


@dataclass
class Edge:
    """One HAProxy on the shipped file, its ports, and what clients need to trust it."""

    https_port: int
    http_port: int
    metrics_port: int
    cafile: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://localhost:{self.https_port}"

    def client(self, source: str) -> httpx.Client:
        """An HTTPS client whose connections come from ``source`` (127.0.0.x)."""
        context = ssl.create_default_context(cafile=str(self.cafile))
        transport = httpx.HTTPTransport(verify=context, local_address=source)
        return httpx.Client(transport=transport, timeout=5)

    def wait_forwarding(self, source: str) -> None:
        """Until the edge forwards a call from ``source`` (it has seen the replica healthy),
        asked over one kept-alive connection so as not to use up the address's budget."""
        with self.client(source) as client:

            def forwarding() -> bool:
                assert self.process.poll() is None, self.log.read_text()
                return answered_by_a_replica(client, self.url)

            wait_until(forwarding, 30, "the edge to forward an API call")

    def denied(self) -> dict[str, float]:
        """Connections refused so far, by frontend, as the edge's exporter counts them."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        pattern = r'^haproxy_frontend_denied_connections_total\{proxy="(\w+)"\} (\S+)$'
        return {name: float(value) for name, value in re.findall(pattern, text, re.M)}

    def served(self, source: str) -> bool:
        """Whether a new connection from ``source`` gets an API call answered by the service."""
        with self.client(source) as client:
            return answered_by_a_replica(client, self.url)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real ``secret-manager serve`` behind this module's edges, with /metrics on."""
    directory = tmp_path_factory.mktemp("edge-backend")
    server = ServerProcess(
        {
            "MASTER_KEY": generate_key(),
            "TRUSTED_PROXIES": "127.0.0.1/32",
            "DATA_DIR": str(directory / "data"),
            "RATE_LIMIT": "off",
        },
        [],
        directory,
    )
    yield server
    server.stop()


@pytest.fixture
def start_edge(
    certificate: tuple[Path, Path], backend: ServerProcess, tmp_path: Path
) -> Iterator[Callable[..., Edge]]:
    """``start_edge(EDGE_X="...")``: HAProxy on the shipped file in front of ``backend``, on
    free loopback ports, with the given variables besides; stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(**variables: str) -> Edge:
            https_port, http_port, metrics_port = free_port(), free_port(), free_port()
            log = tmp_path / f"haproxy-{https_port}.log"
            env = {
                "EDGE_TLS_PEM": str(certificate[1]),
                "EDGE_HTTPS_BIND": f"127.0.0.1:{https_port}",
                "EDGE_HTTP_BIND": f"127.0.0.1:{http_port}",
                "EDGE_METRICS_BIND": f"127.0.0.1:{metrics_port}",
                "EDGE_BACKEND": f"127.0.0.1:{backend.port}",
                "EDGE_BACKEND_SLOTS": "1",
                **variables,
            }
            process = stack.enter_context(edge(env, log))

            def listening() -> bool:
                assert process.poll() is None, log.read_text()
                return all(accepts(port) for port in (https_port, http_port))

            wait_until(listening, 10, "HAProxy to listen")
            return Edge(https_port, http_port, metrics_port, certificate[0], log, process)

        yield start


def accepts(port: int) -> bool:
    """Whether something listens on ``port`` (asked from 127.0.0.1, no test's client)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def connect(source: str, port: int) -> socket.socket:
    """A TCP connection from ``source`` to the edge that sends nothing."""
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def closed_by_the_edge(sock: socket.socket, within: float) -> bool:
    """Whether the edge closed ``sock`` (end of stream or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLEOFError):
        return True
    except TimeoutError:
        return False


def refused(source: str, port: int, within: float = 2) -> bool:
    """Whether a new connection from ``source`` is closed by the edge within ``within``
    seconds, before it sent anything: reset while connecting, or ended or reset just after."""
    try:
        sock = connect(source, port)
    except ConnectionResetError:
        return True
    with sock:
        return closed_by_the_edge(sock, within)


def still_open(socks: list[socket.socket]) -> bool:
    """None of ``socks`` became readable (a closed one reads its end) within half a second."""
    readable, _, _ = select.select(socks, [], [], 0.5)
    return not readable


def test_one_address_past_its_connection_limit_is_refused_while_another_is_served(
    start_edge: Callable[..., Edge],
) -> None:
    edge = start_edge(EDGE_SOURCE_MAXCONN="5", EDGE_CLIENT_TIMEOUT="30s")
    edge.wait_forwarding("127.0.0.3")
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connect("127.0.0.2", edge.https_port)) for _ in range(5)]
        assert still_open(held)  # five idle connections from 127.0.0.2 are allowed ...
        # ... the sixth and later are closed at once, on either port, before any TLS ...
        ports = [edge.https_port, edge.https_port, edge.http_port]
        assert [refused("127.0.0.2", port) for port in ports] == [True] * 3
        assert still_open(held)  # ... and the first five are kept.
        # Not logged (a flood would fill the log), but counted.
        assert edge.denied() == {"http": 1, "https": 2, "metrics": 0}
        # Another address is served meanwhile.
        assert edge.served("127.0.0.3")
        with edge.client("127.0.0.3") as client:
            created = client.post(edge.url + "/vault/secret/create", json={"secret": b64(b"hi")})
        assert created.status_code == 200
        assert "X-Served-By" in created.headers
    # A limit on connections at once, not a ban: once they are closed, 127.0.0.2 is served.
    wait_until(lambda: not refused("127.0.0.2", edge.https_port, 0.5), 10, "a free slot")
    assert edge.served("127.0.0.2")


def test_one_address_past_its_connection_rate_is_refused_while_another_is_served(
    start_edge: Callable[..., Edge],
) -> None:
    edge = start_edge(EDGE_SOURCE_CONN_RATE="5")
    edge.wait_forwarding("127.0.0.5")
    # Five new connections in a row from 127.0.0.4, each with a call the service answers ...
    assert [edge.served("127.0.0.4") for _ in range(5)] == [True] * 5
    # ... then the sixth within 10 s is closed at once, and the next, on either port.
    assert refused("127.0.0.4", edge.https_port)
    assert refused("127.0.0.4", edge.http_port)
    assert edge.served("127.0.0.5")


def raw_get(port: int, cafile: Path, target: str) -> tuple[int, bytes]:
    """``GET target`` over TLS exactly as written (httpx would tidy the path up first)."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        tls.sendall(request.encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


OVERLAY_ONLY = ["/metrics", "/healthz", "/readyz"]
NOBODYS = ["/", "/vault", "/METRICS", "/%6Detrics", "//metrics", "/stats"]
DOCS = ["/docs", "/openapi.json", "/docs/assets/swagger-ui.css"]


def test_only_the_api_and_its_docs_are_forwarded_and_every_answer_has_hsts(
    start_edge: Callable[..., Edge], backend: ServerProcess
) -> None:
    # The service itself answers them: the edge is what refuses them below.
    for path in OVERLAY_ONLY:
        assert httpx.get(backend.url + path, timeout=5).status_code == 200, path
    edge = start_edge()
    edge.wait_forwarding("127.0.0.6")
    with edge.client("127.0.0.6") as client:
        for path in OVERLAY_ONLY + NOBODYS:
            refused = client.get(edge.url + path)
            assert refused.status_code == 404, path
            assert "X-Served-By" not in refused.headers, path  # the edge's own answer
            assert "/vault/" in refused.json()["detail"]
            assert refused.headers["Strict-Transport-Security"] == HSTS
        created = client.post(edge.url + "/vault/secret/create", json={"secret": b64(b"hi")})
        assert created.status_code == 200
        assert "X-Served-By" in created.headers
        assert created.headers["Strict-Transport-Security"] == HSTS
        fetched = client.post(edge.url + "/vault/secret/fetch", json=created.json())
        assert fetched.json()["secret"] == b64(b"hi")
        for path in DOCS:  # on by default
            docs = client.get(edge.url + path)
            assert docs.status_code == 200, path
            assert "X-Served-By" in docs.headers
            assert docs.headers["Strict-Transport-Security"] == HSTS
    # Nor does a path that only names /metrics after the API's prefix reach it.
    for target in ["/vault/../metrics", "/vault/%2e%2e/metrics", "/docs/assets/../../metrics"]:
        status, body = raw_get(edge.https_port, edge.cafile, target)
        assert b"# HELP" not in body, target
        assert status in (400, 404), target


def test_the_docs_can_be_kept_off_the_edge(start_edge: Callable[..., Edge]) -> None:
    edge = start_edge(EDGE_PUBLIC_DOCS="off")
    edge.wait_forwarding("127.0.0.7")
    with edge.client("127.0.0.7") as client:
        for path in DOCS:
            refused = client.get(edge.url + path)
            assert refused.status_code == 404, path
            assert "X-Served-By" not in refused.headers, path
            assert refused.json()["detail"] == "no such path: the API is under /vault/"
        created = client.post(edge.url + "/vault/secret/create", json={"secret": b64(b"hi")})
        assert created.status_code == 200


def plain_request(port: int, request: bytes) -> tuple[int, str]:
    """(status, Location) of a request sent to the plain port exactly as written."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    head = answer.partition(b"\r\n\r\n")[0].decode()
    location = re.search(r"^location: (.*)$", head, re.I | re.M)
    return int(head.split()[1]), location.group(1).strip() if location else ""


def test_plain_http_goes_to_the_public_host_whatever_host_the_client_names(
    start_edge: Callable[..., Edge],
) -> None:
    edge = start_edge(EDGE_PUBLIC_HOST="secrets.example.test")
    public = "https://secrets.example.test"
    hostile = "Host: evil.example\r\nX-Forwarded-Host: evil.example\r\n"
    requests = [
        ("GET /vault/secret/fetch?a=1&b=2 HTTP/1.1", hostile, "/vault/secret/fetch?a=1&b=2"),
        (
            "POST /vault/secret/create HTTP/1.1",
            f"{hostile}Content-Length: 0\r\n",
            "/vault/secret/create",
        ),
        # The absolute form names a host too: it is ignored as well.
        ("GET http://evil.example/docs HTTP/1.1", hostile, "/docs"),
        ("GET / HTTP/1.0", "", "/"),  # no Host at all
    ]
    for line, headers, path in requests:
        request = f"{line}\r\n{headers}\r\n".encode()
        assert plain_request(edge.http_port, request) == (308, public + path), line


def test_a_connection_that_never_starts_tls_or_a_request_is_closed_at_the_deadline(
    start_edge: Callable[..., Edge],
) -> None:
    """With the shipped defaults: 5 s for the TLS handshake, 5 s for the first request."""
    edge = start_edge()
    context = ssl.create_default_context(cafile=str(edge.cafile))
    context.set_alpn_protocols(["http/1.1"])
    with (
        connect("127.0.0.8", edge.https_port) as silent,
        connect("127.0.0.8", edge.https_port) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as idle_tls,
    ):
        started = time.monotonic()
        idle_tls.setblocking(False)
        open_since: dict[str, float] = {}
        pending = {"no TLS": silent, "TLS, no request": idle_tls}
        while pending and time.monotonic() - started < 10:
            readable, _, _ = select.select(list(pending.values()), [], [], 0.2)
            for name, sock in list(pending.items()):
                if sock in readable and ended(sock):
                    open_since[name] = time.monotonic() - started
                    del pending[name]
    assert set(open_since) == {"no TLS", "TLS, no request"}, open_since
    # Closed at the deadline: not at once (refused), not 30 s later.
    assert all(4 <= seconds <= 7 for seconds in open_since.values()), open_since


def ended(sock: socket.socket) -> bool:
    """Whether a readable socket reached its end (it may first read the edge's 408)."""
    try:
        while data := sock.recv(4096):
            assert data.startswith(b"HTTP/1.1 408"), data
        return True
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except (ConnectionResetError, ssl.SSLEOFError):
        return True


def h2_settings(port: int, cafile: Path) -> dict[int, int]:
    """The SETTINGS the edge announces to an HTTP/2 client (RFC 9113 section 6.5)."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04\x00" + bytes(4))
        received = b""

        def at_least(size: int) -> bytes:
            nonlocal received
            while len(received) < size:
                chunk = tls.recv(4096)
                assert chunk, "the edge closed the connection before its SETTINGS"
                received += chunk
            return received

        while True:
            header = at_least(9)
            length, kind, flags = int.from_bytes(header[:3], "big"), header[3], header[4]
            payload = at_least(9 + length)[9 : 9 + length]
            received = received[9 + length :]
            if kind == 0x4 and not flags & 0x1:  # SETTINGS, not an acknowledgement
                return {
                    int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(
                        payload[i + 2 : i + 6], "big"
                    )
                    for i in range(0, length, 6)
                }


def test_an_http2_connection_carries_at_most_ten_requests_at_once(
    start_edge: Callable[..., Edge],
) -> None:
    """maxconn counts connections: the streams on each are bounded too (docs/edge.md)."""
    edge = start_edge()
    max_concurrent_streams = 0x3
    assert h2_settings(edge.https_port, edge.cafile)[max_concurrent_streams] == 10
