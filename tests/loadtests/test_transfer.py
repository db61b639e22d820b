"""The export/import benchmark runs as docs/performance.md says: every step carries every
record, on SQLite and MongoDB, and reports a peak RSS of the step's own process (speed and
memory are never gated)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.transfer import run_step
from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.slow

RECORDS = 300
STEPS = [
    "export --audit: SQLite → file",
    "import: file → SQLite",
    "import: file → MongoDB",
    "export --audit: MongoDB → file",
    "pipe SQLite → MongoDB: export --audit",
    "pipe SQLite → MongoDB: import",
]


def test_a_small_run_carries_every_record_through_every_step(mongo_uri: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.transfer", "--records", str(RECORDS),
         "--mongo-uri", mongo_uri],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert [cell.strip() for cell in header] == [
        "step", "secrets", "audit records", "seconds", "records/s", "peak RSS MiB", "CPU s",
        "DB CPU s",
    ]  # fmt: skip
    cells = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in body}
    assert list(cells) == STEPS
    for step, (secrets, audit, seconds, rate, rss, cpu, db_cpu) in cells.items():
        assert (int(secrets), int(audit)) == (RECORDS, RECORDS), step
        assert float(seconds) > 0 and float(rate) > 0 and float(cpu) > 0, step
        # The step's own process: a Python with the store drivers loaded is tens of MiB, and
        # far less than this harness would pass on to a child it started directly.
        assert 15 < float(rss) < 200, step
        assert db_cpu == "-", step  # the fixture's server: not this run's to measure


def test_a_size_list_that_is_not_numbers_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.transfer", "--sizes", "20000,lots"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "expected counts like 20000,200000, not 20000,lots" in result.stderr


def test_a_step_reports_its_own_peak_memory_not_the_harness_s(tmp_path: Path) -> None:
    # Linux carries a parent's high-water mark into a child across fork and exec: read
    # straight from wait4, a step started by a 300 MiB harness would report 300 MiB.
    ballast = b"x" * (300 << 20)  # written, so resident
    finished = run_step(["--help"], clean_env(), tmp_path, 60, "secret-manager --help")
    assert len(ballast) == 300 << 20
    assert finished.returncode == 0
    assert 5 < finished.peak_rss_kib / 1024 < 150
