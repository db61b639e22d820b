"""Fixtures of the load-harness tests: the HAProxy binary the cluster harness runs, a
checkout of this revision for the benchmark to compare with, and stand-in servers that
misbehave on purpose so the harness's verdicts can be seen to fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT


class JSONHandler(BaseHTTPRequestHandler):
    """A stand-in server's request handler: reads a JSON body, answers JSON, logs nothing."""

    def json_body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def answer(self, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def stand_in_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port in a thread; yield its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def haproxy() -> str:
    """HAProxy's path; only outside CI may its absence skip a test."""
    path = shutil.which("haproxy")
    if path is None and os.access("/usr/sbin/haproxy", os.X_OK):
        path = "/usr/sbin/haproxy"  # Debian's, when /usr/sbin is not on PATH
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed; .ci/run must install it")
        pytest.skip("haproxy is not installed on this machine")
    return path


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()


@pytest.fixture
def head_checkout(tmp_path: Path) -> Path:
    """A checkout of this repository's HEAD commit in ``tmp_path`` (a clone sharing its
    objects, so the repository itself and its worktrees are left alone)."""
    try:
        head = git(ROOT, "rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs in a git checkout, but: {exc}")
        pytest.skip(f"not a git checkout, or no git: {exc}")
    checkout = tmp_path / "previous"
    git(tmp_path, "clone", "--quiet", "--shared", "--no-checkout", str(ROOT), str(checkout))
    git(checkout, "checkout", "--quiet", "--detach", head)
    return checkout
