"""The harness's verdict: Locust's per-second history read around the kill, and the loss check.

The loss check is what makes the failover run mean something: it must call a secret lost
when the service answers without it or with other bytes, and unverified when nothing answers.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx2 as httpx
import pytest

from loadtests.report import counts_at, read_acks, verify
from tests.conftest import ServerProcess, b64


def test_failures_in_the_second_of_the_kill_count_as_after_it(tmp_path: Path) -> None:
    # Locust's history as it was written in a real run: the row stamped with the kill's own
    # second was written after the kill and already holds the 4 creates it cut off.
    rows = [("1795885764", "Aggregated", 778, 0), ("1795885765", "Aggregated", 1048, 0),
            ("1795885765", "POST create", 524, 0), ("1795885766", "Aggregated", 1347, 4),
            ("1795885767", "Aggregated", 1628, 4)]  # fmt: skip
    (tmp_path / "locust_stats_history.csv").write_text(
        "Timestamp,Name,Total Request Count,Total Failure Count\n"
        + "".join(f"{t},{name},{n},{f}\n" for t, name, n, f in rows)
    )
    assert counts_at(tmp_path, 1795885766.05) == (1048, 0)  # so all 4 fall after the kill
    assert counts_at(tmp_path, 1795885767.0) == (1347, 4)
    assert counts_at(tmp_path, 1795885764.5) == (0, 0)  # nothing surely counted before it
    assert counts_at(tmp_path / "missing", 1795885766.0) is None


@pytest.mark.slow
def test_the_loss_check_catches_a_missing_or_altered_secret(
    start_server: Callable[..., ServerProcess], mongo_uri: str, master_key: str, tmp_path: Path
) -> None:
    server = start_server(
        {"MASTER_KEY": master_key, "MONGO_URI": mongo_uri, "MONGO_DB": "t" + uuid.uuid4().hex}
    )
    stored = []
    for plaintext in (b"kept", b"altered"):
        response = httpx.post(
            server.url + "/vault/secret/create/", json={"secret": b64(plaintext)}, timeout=10
        )
        assert response.status_code == 200
        stored.append((response.json()["secret_id"], hashlib.sha256(plaintext).hexdigest()))
    (kept_id, kept_hash), (altered_id, _) = stored
    missing_id = str(uuid.uuid4())
    ack_file = tmp_path / "acked.txt"
    ack_file.write_text(
        f"{kept_id} {kept_hash}\n"
        f"{altered_id} {hashlib.sha256(b'something else').hexdigest()}\n"
        f"{missing_id} {kept_hash}\n"
        "a line cut short\n"
    )

    acks, malformed = read_acks(ack_file)
    assert malformed == 1
    lost, unverified = verify(server.url, acks)

    assert sorted(lost) == sorted([altered_id, missing_id])
    assert unverified == []

    # No answer at all is not "intact" either.
    server.stop()
    assert verify(server.url, acks[:1]) == ([], [kept_id])
