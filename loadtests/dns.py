"""A tiny DNS server for the harness's HAProxy: one name, answered with the replicas' addresses.

The shipped haproxy.cfg finds the replicas with ``server-template`` through a ``resolvers``
section, as it does with Docker's ``tasks.<service>`` in Swarm. Here each replica listens on
its own loopback address (127.0.0.11, 127.0.0.12, ...) and one port, and this server answers
A queries for the backend name with those addresses, so the same file runs unchanged.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Sequence

from loadtests.processes import log

TYPE_A = 1
CLASS_IN = 1
RCODE_NXDOMAIN = 3


def query_name(packet: bytes) -> tuple[str, int, int]:
    """The question's (lower-case name, type, offset just past the question)."""
    labels: list[str] = []
    offset = 12
    while packet[offset]:
        length = packet[offset]
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii").lower())
        offset += 1 + length
    qtype, _qclass = struct.unpack("!HH", packet[offset + 1 : offset + 5])
    return ".".join(labels), qtype, offset + 5


def answer(packet: bytes, name: str, addresses: Sequence[str]) -> bytes:
    """The reply to ``packet``: A records of ``addresses`` for ``name``, none for other types,
    NXDOMAIN for other names. Only the first question is read (resolvers send one)."""
    (ident, flags) = struct.unpack("!HH", packet[:4])
    asked, qtype, end = query_name(packet)
    question = packet[12:end]
    known = asked == name.lower()
    records = list(addresses) if known and qtype == TYPE_A else []
    # QR, the query's opcode and RD echoed, AA; NXDOMAIN for any other name.
    reply_flags = 0x8400 | (flags & 0x7900) | (0 if known else RCODE_NXDOMAIN)
    header = struct.pack("!HHHHHH", ident, reply_flags, 1, len(records), 0, 0)
    body = b"".join(
        # A pointer to the question's name, A IN, TTL 1 s, 4 bytes of address.
        struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 1, 4) + socket.inet_aton(address)
        for address in records
    )
    return header + question + body


class DnsServer:
    """A UDP DNS server on 127.0.0.1 in a daemon thread, answering for one name."""

    def __init__(self, name: str, addresses: Sequence[str]) -> None:
        self.name = name
        self.addresses = list(addresses)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)
        self._thread.start()
        log(f"DNS on {self.address}: {name} -> {', '.join(self.addresses)}")

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, peer = self._socket.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                self._socket.sendto(answer(packet, self.name, self.addresses), peer)
            except (IndexError, UnicodeDecodeError, struct.error):
                continue  # not a query we understand: no answer, as a resolver would drop it

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._socket.close()
