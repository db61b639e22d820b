"""Local processes for the load harnesses: start, watch and stop them, find ports and programs.

Shared by the cluster harness (``loadtests.cluster``) and the benchmark (``loadtests.bench``):
every child runs in its own session with its output in a log file, and is stopped within
bounded waits, so a harness never leaves a process behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx2 as httpx


class ClusterError(Exception):
    """The cluster could not be set up or run: a configuration or environment problem."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a child to listen on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; ClusterError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise ClusterError(f"timed out after {timeout:g}s waiting for {what}")


def log(message: str) -> None:
    """A progress line on stderr, so stdout stays for the summary (``--json``)."""
    print(f"cluster: {message}", file=sys.stderr, flush=True)


class Process:
    """A child process with its output in a log file, stopped within bounded waits."""

    def __init__(
        self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        try:
            # Its own session: a Ctrl-C reaches only this harness, which stops the children
            # in order (load first, then balancer, replicas, database).
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(  # noqa: S603 (our commands)
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise ClusterError(f"cannot start {name} ({command[0]}): {exc}") from None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise ClusterError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"{self.log_path} ends with:\n{self.tail()}"
            )

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def reap(self, timeout: float) -> int:
        """Wait for the exit (SIGKILL after ``timeout``); the exit status."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop within {timeout:g}s; killing it")
            self.popen.kill()
            self.popen.wait(10)
        finally:
            self._log.close()
        return self.popen.returncode

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int:
        self.send(sig)
        return self.reap(timeout)


def executable(name: str, *fallbacks: str) -> str:
    """The full path of a program this harness runs, or a ClusterError saying what to install."""
    found = shutil.which(name)
    if found:
        return found
    for path in fallbacks:
        if os.access(path, os.X_OK):
            return path
    hint = {
        "haproxy": "apt-get install haproxy",
        "wrk": "apt-get install wrk",
        "nx-27017": "pip install nx-27017",
    }[name]
    raise ClusterError(f"{name} is not installed ({hint})")


def answers_200(url: str) -> bool:
    """Whether ``url`` answers 200 within a second: the readiness probe of a started server."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def positive_int(value: str) -> int:
    """An argparse type for counts that must be at least 1 (replicas, users, rounds...)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return number
