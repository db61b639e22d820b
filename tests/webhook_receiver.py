"""A real webhook receiver for the tests: an HTTP server on 127.0.0.1 in threads of its own,
which records every request (headers and body) and answers as told: 200, 500, or not at
all (it hangs), or is down (its port refuses connections) until started again."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from standardwebhooks.webhooks import Webhook

from loadtests.processes import ClusterError, free_port, wait_for

OK, FAIL, HANG = "ok", "fail", "hang"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # not 5: a burst of deliveries is never refused by the backlog


@dataclass(frozen=True)
class Delivery:
    """One request the receiver got: its headers (names in lower case), body and path, the
    status it answered (0: none, it hung) and when (time.monotonic)."""

    headers: dict[str, str]
    body: bytes
    path: str
    status: int
    at: float
    peer: int = 0  # the sender's port: one per connection

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """See the module docstring; ``mode`` is OK, FAIL or HANG, and may change any time."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.mode = OK
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._open: set[socket.socket] = set()  # connections being served
        self._server: _Server | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # a connection is kept alive between requests

            def setup(self) -> None:
                super().setup()
                with receiver._lock:
                    receiver._open.add(self.connection)

            def finish(self) -> None:
                with receiver._lock:
                    receiver._open.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                mode = receiver.mode
                status = {OK: 200, FAIL: 500}.get(mode, 0)
                receiver._record(
                    Delivery(
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                        self.path,
                        status,
                        time.monotonic(),
                        self.client_address[1],
                    )
                )
                if mode == HANG:
                    receiver._release.wait(60)
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._release.clear()
        server = _Server(("127.0.0.1", self.port), Handler)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Down: the port refuses connections (a request hanging is let go)."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:  # and the connections kept alive are closed: it is down
            kept, self._open = list(self._open), set()
        for conn in kept:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _record(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)

    def snapshot(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def acknowledged(self) -> list[Delivery]:
        """The requests it answered 2xx."""
        return [d for d in self.snapshot() if d.status == 200]

    def acknowledged_ids(self) -> set[str]:
        return {d.id for d in self.acknowledged()}

    def wait_for(self, predicate: Callable[[Receiver], bool], timeout: float, what: str) -> None:
        try:
            wait_for(lambda: predicate(self), timeout, what)
        except ClusterError as exc:
            raise AssertionError(f"{exc}; received {len(self.snapshot())} requests") from None


def verified(secret: str, delivery: Delivery) -> object:
    """The payload, verified as a receiver verifies it: with the reference implementation
    of Standard Webhooks (raises WebhookVerificationError when the signature is wrong)."""
    return Webhook(secret).verify(delivery.body, delivery.headers)
