"""The benchmark runs as docs/performance.md says and prints its table (speed is never gated):
create and fetch beside the naive app, and the lifecycle's read-limited fetches and deletes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.slow

ALL_OPS = ("create", "fetch", "fetch (max_reads 1000000)", "fetch (max_reads 1)", "delete")


def test_a_short_bench_run_prints_every_row_with_zero_errors() -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI"):
            pytest.fail("wrk is not installed; .ci/run must install it")
        pytest.skip("wrk is not installed on this machine")
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--duration", "1", "--concurrency", "4",
         "--only", "full stack", "naive (2 sync inserts)"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert [cell.strip() for cell in header][-2:] == ["DB CPU µs/req", "errors"]
    cells = {(row[0].strip(), row[1].strip()): [c.strip() for c in row] for row in body}
    ops = {
        "echo (floor)": ALL_OPS,
        "full stack": ALL_OPS,
        "naive (2 sync inserts)": ("create", "fetch"),  # no read limits, no delete
    }
    assert sorted(cells) == sorted((config, op) for config, names in ops.items() for op in names)
    for config, names in ops.items():
        for op in names:
            row = cells[config, op]
            # No errors: every fetch of a used-up secret or delete of a gone one is a 404,
            # so each cell of the lifecycle had a fresh secret for every request.
            assert row[-1] == "0", f"{config} {op} had errors: {row}"
            assert float(row[2]) > 0 and float(row[6]) > 0  # req/s and CPU µs/req measured
    # The naive app answers create and fetch only: no comparison for the other rows.
    assert cells["full stack", "create"][8].endswith("x")
    assert cells["full stack", "delete"][8] == "-"
    # The database's CPU is read from the nx-27017 the bench started; the echo touches none.
    assert float(cells["full stack", "create"][-2]) > 0
    assert cells["echo (floor)", "create"][-2] == "0"


def test_a_configuration_name_that_does_not_exist_is_refused() -> None:
    # A typo used to benchmark the echo floor alone and exit 0.
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--only", "fullstack"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "no configuration named 'fullstack'" in result.stderr
    assert "'full stack'" in result.stderr  # the names it knows
