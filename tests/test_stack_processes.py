"""The middleware stack across real server processes: shared limits, workers, traces, flush."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from loadtests.processes import free_port
from tests.conftest import ServerProcess, b64, clean_env, worker_processes

pytestmark = pytest.mark.slow

StartServer = Callable[..., ServerProcess]


def post(url: str, path: str, payload: dict[str, str], **headers: str) -> httpx.Response:
    # A fresh connection per request, so several workers all get a share.
    with httpx.Client(timeout=10, headers=headers) as client:
        return client.post(url + path, json=payload)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_one_rate_limit_is_shared_by_two_replicas(
    start_server: StartServer, mongo_uri: str, master_key: str, tmp_path: Path
) -> None:
    env = {
        "MASTER_KEY": master_key,
        "RATE_LIMIT": "4/hour",
        "RATE_LIMIT_STORAGE": mongo_uri,
        "MONGO_DB": "t" + uuid.uuid4().hex[:16],
    }
    one = start_server({**env, "DATA_DIR": str(tmp_path / "one")})
    two = start_server({**env, "DATA_DIR": str(tmp_path / "two")})
    unknown = {"secret_id": str(uuid.uuid4())}
    statuses = [
        post(url, "/vault/secret/fetch", unknown).status_code for url in [one.url, two.url] * 2
    ]
    assert statuses == [404] * 4
    for server in (one, two):
        refused = post(server.url, "/vault/secret/fetch", unknown)
        assert refused.status_code == 429
        assert refused.headers["ratelimit-remaining"] == "0"


def test_each_api_key_has_a_budget_of_its_own_shared_by_every_worker(
    start_server: StartServer, mongo_uri: str, master_key: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    tokens = {"noisy": secrets.token_urlsafe(32), "quiet": secrets.token_urlsafe(32)}
    server = start_server(
        {
            "MASTER_KEY": master_key,
            "DATA_DIR": str(tmp_path / "data"),
            "API_KEYS": ",".join(f"{name}:{token}" for name, token in tokens.items()),
            "RATE_LIMIT_PER_KEY": "4/hour",
            "RATE_LIMIT_STORAGE": mongo_uri,
            "MONGO_DB": "t" + uuid.uuid4().hex[:16],
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
        "--workers",
        "2",
    )

    def create_as(name: str) -> httpx.Response:
        auth = f"Bearer {tokens[name]}"
        return post(server.url, "/vault/secret/create", {"secret": b64(b"x")}, Authorization=auth)

    def workers_that_answered() -> int:
        counts = counted_per_process(
            metrics_dir, "http_requests_total", route="/vault/secret/create"
        )
        return sum(1 for count in counts.values() if count)

    # Until both workers have answered the noisy key (the kernel hands each connection to
    # either), and a few past its budget: with a count per worker, more than 4 would pass.
    noisy = [create_as("noisy") for _ in range(6)]
    while workers_that_answered() < 2 and len(noisy) < 60:
        noisy.append(create_as("noisy"))
    assert workers_that_answered() == 2, "both workers should have answered the noisy key"
    assert [r.status_code for r in noisy] == [200] * 4 + [429] * (len(noisy) - 4)
    assert "at most 4 requests per hour for this API key" in noisy[-1].json()["detail"]
    assert noisy[-1].headers["ratelimit-remaining"] == "0"
    # The same client address, with another key: its own budget, untouched by the first.
    assert [create_as("quiet").status_code for _ in range(6)] == [200] * 4 + [429] * 2
    assert server.stop() == 0


def test_a_per_key_limit_without_api_keys_stops_serve_with_one_line(
    master_key: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vault", "serve", "--port", str(free_port())],
        env=clean_env(
            MASTER_KEY=master_key, DATA_DIR=str(tmp_path / "data"), RATE_LIMIT_PER_KEY="10/second"
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "secret-manager: RATE_LIMIT_PER_KEY is set but API keys are off, so it would limit "
        "nothing: set API_KEYS or API_KEYS_FILE, or set RATE_LIMIT_PER_KEY=off\n"
    )


def counted_per_process(metrics_dir: Path, sample: str, **labels: str) -> dict[str, float]:
    """A counter's ``sample`` (with at least ``labels``) as each process wrote it in its own
    file. A request is counted once it is answered: read right after, a count may lag."""
    counts: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        values = MmapedDict(str(path), read_mode=True)
        try:
            counts[path.stem] = sum(
                value
                for key, value, _ in values.read_all_values()
                if json.loads(key)[1] == sample and labels.items() <= json.loads(key)[2].items()
            )
        finally:
            values.close()
    return counts


def created_per_process(metrics_dir: Path) -> dict[str, float]:
    """vault_secrets_created_total as each process wrote it in its own file."""
    return counted_per_process(metrics_dir, "vault_secrets_created_total")


def test_metrics_add_up_across_two_workers(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_99999999.db").write_bytes(b"stale values of an earlier run")
    server = start_server(
        {
            "MASTER_KEY": master_key,
            "DATA_DIR": str(tmp_path / "data"),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "RATE_LIMIT": "off",
        },
        "--workers",
        "2",
    )
    for _ in range(30):
        assert post(server.url, "/vault/secret/create", {"secret": b64(b"x")}).status_code == 200
    assert not (metrics_dir / "counter_99999999.db").exists()
    served = [count for count in created_per_process(metrics_dir).values() if count]
    assert len(served) == 2, "both workers should have served"
    assert sum(served) == 30
    # Whichever worker answers the scrape, it reports the sum of both.
    assert {metric(server.url, "vault_secrets_created_total") for _ in range(6)} == {30.0}
    assert server.stop() == 0


def test_metrics_add_up_across_two_workers_in_the_directory_serve_makes(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    # No PROMETHEUS_MULTIPROC_DIR: serve makes a temporary one, and every worker's app is
    # told of it with the rest of its settings.
    env = {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data"), "RATE_LIMIT": "off"}
    server = start_server(env, "--workers", "2")
    for _ in range(30):
        assert post(server.url, "/vault/secret/create", {"secret": b64(b"x")}).status_code == 200
    [worker, *_] = worker_processes(server.process.pid)
    environment = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    [entry] = [entry for entry in environment if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    metrics_dir = Path(entry.partition(b"=")[2].decode())
    served = [count for count in created_per_process(metrics_dir).values() if count]
    assert len(served) == 2, "both workers should have served"
    assert {metric(server.url, "vault_secrets_created_total") for _ in range(6)} == {30.0}
    assert server.stop() == 0
    assert not metrics_dir.exists()  # serve removes the directory it made


def test_callers_trace_is_joined_and_carries_no_secret(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    server = start_server(
        {
            "MASTER_KEY": master_key,
            "DATA_DIR": str(tmp_path / "data"),
            "OTEL_TRACES_EXPORTER": "console",
        }
    )
    trace_id = os.urandom(16).hex()
    parent = os.urandom(8).hex()
    secret = b64(b"traced-secret-" + os.urandom(6))
    created = post(
        server.url,
        "/vault/secret/create",
        {"secret": secret},
        traceparent=f"00-{trace_id}-{parent}-01",
    )
    secret_id = created.json()["secret_id"]
    post(server.url, "/vault/secret/fetch", {"secret_id": secret_id})
    httpx.get(server.url + "/healthz", timeout=5)
    assert server.stop() == 0  # flushes the span processor

    output = server.output()
    spans = [json.loads(line) for line in output.splitlines() if line.startswith('{"name"')]
    joined = [s for s in spans if s["context"]["trace_id"] == "0x" + trace_id]
    names = {s["name"] for s in joined}
    assert "POST /vault/secret/create" in names
    assert "store.insert" in names
    assert any(s["parent_id"] == "0x" + parent for s in joined)
    assert all(s["resource"]["attributes"]["service.name"] == "secret-manager" for s in spans)
    assert not any("/healthz" in json.dumps(s) for s in spans)
    assert secret not in output
    assert secret_id not in output


def audit_count(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(data_dir / "vault.db")) as conn:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])


def test_async_audit_is_flushed_on_sigterm(
    start_server: StartServer, master_key: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(
        {
            "MASTER_KEY": master_key,
            "DATA_DIR": str(data_dir),
            "AUDIT_MODE": "async",
            "AUDIT_STDOUT": "true",
            "RATE_LIMIT": "off",
        }
    )
    with httpx.Client(timeout=10) as client:
        for _ in range(40):
            client.post(server.url + "/vault/secret/fetch", json={"secret_id": str(uuid.uuid4())})
    assert server.stop() == 0
    assert audit_count(data_dir) == 40
    lines: list[dict[str, Any]] = [
        json.loads(line) for line in server.output().splitlines() if line.startswith('{"ts"')
    ]
    audit_lines = [line for line in lines if "op" in line]
    assert len(audit_lines) == 40
    assert {line["outcome"] for line in audit_lines} == {"not_found"}
