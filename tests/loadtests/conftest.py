"""Fixtures of the load-harness tests: the HAProxy binary the cluster harness runs."""

from __future__ import annotations

import os
import shutil

import pytest


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
