"""Hypercorn's own TLS, switched on by TLS_CERT_FILE and TLS_KEY_FILE."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import b64, clean_env, free_port, self_signed

pytestmark = pytest.mark.slow


def test_serves_https_with_the_configured_certificate(tmp_path: Path, master_key: str) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "vault", "serve", "--port", str(port)],
        env=clean_env(
            MASTER_KEY=master_key,
            DATA_DIR=str(tmp_path / "data"),
            TLS_CERT_FILE=str(cert),
            TLS_KEY_FILE=str(key),
            READ_TIMEOUT_SECONDS="2",
        ),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    trusted = ssl.create_default_context(cafile=str(cert))
    try:
        with httpx.Client(base_url=f"https://localhost:{port}", verify=trusted, timeout=5) as c:
            deadline = time.monotonic() + 20
            while True:
                try:
                    c.get("/healthz")
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                    time.sleep(0.1)
            secret_id = c.post("/vault/secret/create", json={"secret": b64(b"x")}).json()[
                "secret_id"
            ]
            assert c.post("/vault/secret/fetch", json={"secret_id": secret_id}).json() == {
                "secret": b64(b"x")
            }
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on a TLS port
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        # A connection that never starts its handshake is closed after READ_TIMEOUT_SECONDS
        # (Hypercorn's own default would hold it 60 s).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            opened = time.monotonic()
            assert idle.recv(1) == b""
            assert time.monotonic() - opened < 2 + 2
    finally:
        process.terminate()
        assert process.wait(20) == 0
        log.close()


def test_half_a_tls_configuration_is_refused(tmp_path: Path, master_key: str) -> None:
    cert, _ = self_signed(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "vault", "serve", "--port", str(free_port())],
        env=clean_env(MASTER_KEY=master_key, TLS_CERT_FILE=str(cert)),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert "TLS_KEY_FILE" in result.stderr
    assert "Traceback" not in result.stderr


def _refusal(tmp_path: Path, master_key: str, cert: Path, key: Path) -> str:
    """Run serve with this pair, expecting a refusal; its standard error."""
    result = subprocess.run(
        [sys.executable, "-m", "vault", "serve", "--port", str(free_port())],
        env=clean_env(
            MASTER_KEY=master_key,
            DATA_DIR=str(tmp_path / "data"),
            TLS_CERT_FILE=str(cert),
            TLS_KEY_FILE=str(key),
        ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line: no lifespan traceback before it
    return lines[0]


def test_a_pair_that_cannot_be_used_is_one_line_naming_the_variables(
    tmp_path: Path, master_key: str
) -> None:
    cert, key = self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = self_signed(other)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    mismatch = _refusal(tmp_path, master_key, cert, other_key)
    assert "TLS_CERT_FILE" in mismatch and "TLS_KEY_FILE" in mismatch
    assert "KEY_VALUES_MISMATCH" in mismatch
    swapped = _refusal(tmp_path, master_key, key, cert)
    assert "cannot be used together" in swapped
    # An encrypted key would make OpenSSL prompt for a passphrase, hanging a terminal.
    assert "is encrypted" in _refusal(tmp_path, master_key, cert, encrypted)
    for line in (mismatch, swapped):
        assert "PRIVATE KEY" not in line and "BEGIN" not in line
