"""Six fixes for Hypercorn 0.18, applied by ``secret-manager serve`` in every worker.

**Shutdown race (asyncio TCP server).** At SIGTERM Hypercorn closes every keep-alive
connection that is idle. A request that arrives on one of them in the same instant could be
read, processed (stored and audited) and then never answered, because the connection was
closed under it: the idle timer's wake-up races the request's start, and Python 3.11's
``asyncio.wait_for`` can swallow the cancellation meant to stop the timer. A client then
sees a dropped connection for a create that did happen.

The fix keeps Hypercorn's behaviour and closes the race: the connection's idle state is
recorded synchronously when the protocol reports it, the timer closes only a connection that
is still idle when it acts, and bytes read after that decision are not served (the client
sees its connection closed before an answer, for a request that was never processed, which
HTTP clients know how to treat).

**Early answers over HTTP/2.** When the app answers before reading the whole request body
(a 413 for an upload over the cap), Hypercorn forgets the stream once the answer is sent,
and the client's next DATA frame for it raises KeyError and drops the whole connection with
an error logged. RFC 9113 (8.1) gives the server a clean way out: after a complete response
it may send RST_STREAM with NO_ERROR to stop the upload. The fix does exactly that when a
stream closes while the client is still sending; the h2 library then discards frames
already in flight for it, keeping the connection's flow-control window intact.

**HTTP/2 connections that end mid-answer.** When an HTTP/2 connection is closed (the client
went away, or it sent nothing for ``read_timeout``) while a stream's answer still waits in
its send buffer, Hypercorn stops the task that sends buffers but leaves the stream waiting
for its buffer to drain: the app task never ends, the connection is never closed, and it is
only cancelled, with an error logged, at shutdown. A stream refused with 408 (its body never
came) met exactly this, as the body deadline and the read timeout are the same setting. The
fix releases those buffers when the connection closes.

**No HTTP/2 in clear text.** Hypercorn has no setting to turn h2c off: a plain connection
whose first request is HTTP/2's preface (prior knowledge) or carries ``Upgrade: h2c`` is
switched to HTTP/2, which the edge in front of the service never asks for. Behind an
HTTP/1.1 proxy, an h2c upgrade is a tunnel past it (h2c smuggling), and Hypercorn 0.18's
own upgrade answers 101 and then fails with an unhandled error. The fix keeps every HTTP/1.1
connection (plain, or TLS where ALPN chose HTTP/1.1) HTTP/1.1: ``Upgrade: h2c`` is ignored
(RFC 9110 7.8), so the request is answered in HTTP/1.1, and the preface is answered ``505
HTTP Version Not Supported`` and the connection closed. HTTP/2 is served over TLS only,
chosen by ALPN.

**Streams reset before their answers (HTTP/2 "rapid reset", CVE-2023-44487).** Hypercorn
caps the streams a client has open at ``h2_max_concurrent_streams``, but a stream the
client resets no longer counts while its app call runs on: one connection that opens and
resets streams in a loop runs any number of requests at once (measured: 300 against a cap
of 100), each with its store call and audit record. The fix counts the app calls each
connection runs, a reset stream's included, and refuses a new stream with REFUSED_STREAM
(nothing processed: a client may retry it) while that count is at the cap; and a client
that has reset or been refused, before their answers, as many streams as the cap and more
than it let finish is sent GOAWAY (ENHANCE_YOUR_CALM) and its connection closed.

**HTTP/2 priority signals.** Hypercorn builds a priority tree from the client's PRIORITY
frames, and one for a stream it has finished with, or never opened, puts that stream back
in the tree: a late write of an app whose stream the client reset then makes the sending
task pick a stream with no send buffer, and its own clean-up raises KeyError. The task
dies, the connection's task group cancels its app calls, and one that answers 503 as it
is cancelled waits forever for a buffer nothing drains: the connection, and the server's
shutdown, hang (measured: 90 streams opened and reset, then PRIORITY frames for them).
PRIORITY frames for 1,000 streams that never opened overflow the tree, an unhandled
error that drops the connection. RFC 9113 (5.3.2) deprecates these signals, and a server
may ignore them; the fix does, so streams share the connection equally.

Written for one Hypercorn release, ``HYPERCORN_VERSION`` (pinned exactly in pyproject.toml).
``check()`` refuses any other release, or one that lacks an attribute in ``REQUIRED``, with a
``ConfigError`` of one line naming it: ``serve`` runs it before it binds, and ``apply()`` runs
it again in every worker, so code written for other internals is never patched in.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from vault.errors import ConfigError

HYPERCORN_VERSION = "0.18.0"

log = logging.getLogger("secret_manager.http2")


class Target(NamedTuple):
    """One attribute the fixes replace or call: a module and a dotted path inside it."""

    module: str
    path: str

    def __str__(self) -> str:
        return f"{self.module}.{self.path}"

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]

    def resolve(self) -> Any:
        """The attribute itself; ImportError or AttributeError when it is not there."""
        value: Any = importlib.import_module(self.module)
        for part in self.path.split("."):
            value = getattr(value, part)
        return value

    def owner(self) -> Any:
        """The class (or module) that holds the attribute, where a replacement is set."""
        parent = self.path.rpartition(".")[0]
        return (
            Target(self.module, parent).resolve()
            if parent
            else importlib.import_module(self.module)
        )


_TCP_SERVER = "hypercorn.asyncio.tcp_server"
_H2 = "hypercorn.protocol.h2"
_H11 = "hypercorn.protocol.h11"

# The attributes apply() replaces, then those its replacements call besides the originals
# they wrap (private too): check() and the tests read these, apply() patches PATCHED.
PROTOCOL_SEND = Target(_TCP_SERVER, "TCPServer.protocol_send")
IDLE_TIMEOUT = Target(_TCP_SERVER, "TCPServer._idle_timeout")
READ_DATA = Target(_TCP_SERVER, "TCPServer._read_data")
CLOSE_STREAM = Target(_H2, "H2Protocol._close_stream")
H2_HANDLE = Target(_H2, "H2Protocol.handle")
CHECK_PROTOCOL = Target(_H11, "H11Protocol._check_protocol")
H11_HANDLE = Target(_H11, "H11Protocol.handle")
H2_HANDLE_EVENTS = Target(_H2, "H2Protocol._handle_events")
PRIORITY_UPDATED = Target(_H2, "H2Protocol._priority_updated")
PATCHED = (
    PROTOCOL_SEND,
    IDLE_TIMEOUT,
    READ_DATA,
    CLOSE_STREAM,
    H2_HANDLE,
    CHECK_PROTOCOL,
    H11_HANDLE,
    H2_HANDLE_EVENTS,
    PRIORITY_UPDATED,
)
MAX_RECV = Target(_TCP_SERVER, "MAX_RECV")
CALLED = (
    MAX_RECV,
    Target(_TCP_SERVER, "TCPServer._initiate_server_close"),
    Target(_H2, "H2Protocol._flush"),
    Target(_H11, "H11Protocol._send_error_response"),
)
REQUIRED = PATCHED + CALLED


def check(version: str | None = None, required: Iterable[Target] = REQUIRED) -> None:
    """Refuse, with a ConfigError of one line, a Hypercorn the fixes were not written for.

    ``version`` is the installed release (looked up when None); ``required`` the attributes
    that must exist in it.
    """
    if version is None:
        try:
            version = importlib.metadata.version("hypercorn")
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(
                f"Hypercorn is not installed: install hypercorn=={HYPERCORN_VERSION}"
            ) from None
    if version != HYPERCORN_VERSION:
        raise ConfigError(
            f"Hypercorn {version} is installed, but vault/hypercorn_fixes.py is written for "
            f"Hypercorn {HYPERCORN_VERSION} exactly: install hypercorn=={HYPERCORN_VERSION}"
        )
    for target in required:
        try:
            target.resolve()
        except (ImportError, AttributeError):
            raise ConfigError(
                f"{target} is missing from the installed Hypercorn {version}, and "
                f"vault/hypercorn_fixes.py relies on it: reinstall hypercorn=={HYPERCORN_VERSION}"
            ) from None


def _fix_idle_shutdown_race() -> dict[Target, Callable[..., Any]]:
    """Fix 1: the shutdown race on idle keep-alive connections.

    Upstream: no Hypercorn issue or pull request reports this race (tracker searched
    2026-12). These three replace TCPServer.protocol_send, _read_data and _idle_timeout as
    of 0.18.0:
    https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/asyncio/tcp_server.py#L79-L141
    (the idle close at shutdown came with
    https://github.com/pgjones/hypercorn/commit/df569bd992b1b41ecf44b6fc96679be2f0f17a64).
    """
    from hypercorn.events import Closed, RawData, Updated

    max_recv = MAX_RECV.resolve()
    original_protocol_send = PROTOCOL_SEND.resolve()

    async def protocol_send(self: Any, event: Any) -> None:
        if isinstance(event, Updated):
            self._secret_manager_idle = event.idle  # before any await: the timer reads it
        await original_protocol_send(self, event)

    async def _idle_timeout(self: Any) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.context.terminated.wait(), self.config.keep_alive_timeout)
        if not getattr(self, "_secret_manager_idle", True):
            return  # a request began meanwhile: it is answered, then the connection closes
        self._secret_manager_closing = True
        await asyncio.shield(self._initiate_server_close())

    async def _read_data(self: Any) -> None:
        while not self.reader.at_eof():
            try:
                data = await asyncio.wait_for(self.reader.read(max_recv), self.config.read_timeout)
            except (ConnectionError, OSError, TimeoutError, ssl.SSLError):
                break
            if getattr(self, "_secret_manager_closing", False):
                break  # the server is closing this idle connection: nothing new is served
            await self.protocol.handle(RawData(data))
        await self.protocol.handle(Closed())

    return {PROTOCOL_SEND: protocol_send, IDLE_TIMEOUT: _idle_timeout, READ_DATA: _read_data}


def _fix_data_for_answered_streams() -> dict[Target, Callable[..., Any]]:
    """Fix 2: DATA for a stream already answered raises KeyError and drops the connection.

    Upstream: https://github.com/pgjones/hypercorn/issues/329. The pull requests for it,
    https://github.com/pgjones/hypercorn/pull/334 and
    https://github.com/pgjones/hypercorn/pull/312 (open as of 2026-12), skip such DATA in
    H2Protocol._handle_events; this wraps _close_stream instead and resets the stream, so
    the client stops sending and h2 discards what is already in flight.
    """
    from h2.errors import ErrorCodes

    original_close_stream = CLOSE_STREAM.resolve()

    async def _close_stream(self: Any, stream_id: int) -> None:
        await original_close_stream(self, stream_id)
        h2_stream = self.connection.streams.get(stream_id)
        if h2_stream is not None and not h2_stream.closed and not self.closed:
            # Answered while the client still sends: ask it to stop, without an error.
            self.connection.reset_stream(stream_id, error_code=ErrorCodes.NO_ERROR)
            await self._flush()

    return {CLOSE_STREAM: _close_stream}


def _fix_buffers_of_closed_connections() -> dict[Target, Callable[..., Any]]:
    """Fix 3: stream buffers left waiting when an HTTP/2 connection closes.

    Upstream: no Hypercorn issue or pull request reports it (tracker searched 2026-12).
    This wraps H2Protocol.handle as of 0.18.0, whose Closed branch stops the sending task
    only: https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/protocol/h2.py#L182-L196
    """
    from hypercorn.events import Closed

    original_h2_handle = H2_HANDLE.resolve()

    async def handle(self: Any, event: Any) -> None:
        await original_h2_handle(self, event)
        if isinstance(event, Closed):
            # The sending task stops with the connection: release every stream still
            # waiting for its buffer to drain, or its app task (and the connection) hangs.
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()

    return {H2_HANDLE: handle}


class _PlainHTTP2(Exception):
    """A plain connection opened with HTTP/2's preface: refused, not switched to h2c."""


def _fix_no_h2c() -> dict[Target, Callable[..., Any]]:
    """Fix 4: HTTP/2 in clear text (h2c) is not served, by prior knowledge or by Upgrade.

    Upstream: Hypercorn has no setting for it (``alpn_protocols`` governs TLS only, as
    https://github.com/pgjones/hypercorn/issues/38 says of HTTP/1.1). This replaces
    H11Protocol._check_protocol as of 0.18.0, where it decides both ways in:
    https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/protocol/h11.py#L296-L323
    (its Upgrade path fails after the 101 in 0.18.0:
    https://github.com/pgjones/hypercorn/issues/317), and wraps H11Protocol.handle to answer
    the preface, which _check_protocol sees in the middle of H11Protocol._handle_events.
    """
    from hypercorn.events import Closed

    original_h11_handle = H11_HANDLE.resolve()

    async def _check_protocol(self: Any, event: Any) -> None:
        # RFC 9113 3.4: the preface reads as a request line to an HTTP/1.1 parser. Any
        # ``Upgrade: h2c`` is ignored (RFC 9110 7.8): the request is served in HTTP/1.1.
        if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
            raise _PlainHTTP2

    async def handle(self: Any, event: Any) -> None:
        try:
            await original_h11_handle(self, event)
        except _PlainHTTP2:
            # Before any app runs for it: a status an HTTP/1.1 reader understands, and the
            # close an HTTP/2 client sees at once.
            await self._send_error_response(505)
            await self.send(Closed())

    return {CHECK_PROTOCOL: _check_protocol, H11_HANDLE: handle}


class _StreamGuard:
    """One HTTP/2 connection's task group, counting the app calls it runs, and the
    connection's tally of streams: admitted, reset by the client before their answers were
    complete, and refused at the cap.

    It stands in for the connection's task group (``H2Protocol.task_group``), through which
    every stream starts its app call; Hypercorn sends ``None`` through the call's ``send``
    when the call ends, however it ends.
    """

    def __init__(self, task_group: Any) -> None:
        self._task_group = task_group
        self.running = 0  # app calls started and not ended, those of reset streams included
        self.opened = 0
        self.cancelled = 0
        self.refused = 0
        self.last_started = 0  # the highest stream id whose request was handed on

    async def spawn_app(
        self, app: Any, config: Any, scope: Any, send: Callable[[Any], Any]
    ) -> Callable[[Any], Any]:
        async def app_send(message: Any) -> None:
            if message is None:
                self.running -= 1
            await send(message)

        put: Callable[[Any], Any] = await self._task_group.spawn_app(app, config, scope, app_send)
        self.running += 1
        return put

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        self._task_group.spawn(func, *args)


def _refuse_stream(connection: Any, stream_id: int) -> None:
    """Nothing is processed for this stream: REFUSED_STREAM tells the client it may retry
    (RFC 9113 8.7)."""
    from h2.errors import ErrorCodes
    from h2.exceptions import StreamClosedError

    with contextlib.suppress(StreamClosedError):  # the client reset it too
        connection.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)


async def _calm_down(protocol: Any, last_started: int, unfinished: int, answered: int) -> None:
    """Close a rapid resetter's connection with GOAWAY ENHANCE_YOUR_CALM. Nothing of the
    batch at hand is started (GOAWAY names the last stream that was); what already runs
    finishes on its own."""
    from h2.errors import ErrorCodes
    from hypercorn.events import Closed

    log.warning(
        "HTTP/2 connection from %s closed: its client reset or was refused %d streams "
        "before their answers and let %d finish (GOAWAY ENHANCE_YOUR_CALM)",
        protocol.client[0] if protocol.client else "unknown",
        unfinished,
        answered,
    )
    protocol.connection.close_connection(
        error_code=ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=last_started
    )
    await protocol._flush()
    await protocol.send(Closed())


def _fix_rapid_reset() -> dict[Target, Callable[..., Any]]:
    """Fix 5: HTTP/2 streams reset before their answers run on past the stream cap.

    Upstream: https://github.com/pgjones/hypercorn/issues/146, answered by
    ``keep_alive_max_requests`` (a GOAWAY after that many requests on one connection:
    https://github.com/pgjones/hypercorn/commit/926c4303a7298ce53a772cf6cec9a3da75be35a2),
    which bounds the streams a connection opens in all, not how many run at once. This
    wraps H2Protocol._handle_events as of 0.18.0, whose StreamReset branch forgets the
    stream while its app call runs on:
    https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/protocol/h2.py#L244-L284
    """
    from h2.events import DataReceived, RequestReceived, StreamReset

    original_handle_events = H2_HANDLE_EVENTS.resolve()

    async def _handle_events(self: Any, events: list[Any]) -> None:
        guard = self.task_group
        if not isinstance(guard, _StreamGuard):
            guard = self.task_group = _StreamGuard(guard)
        cap = self.config.h2_max_concurrent_streams
        # Streams answered in full: neither reset by the client nor still open. Nothing
        # below awaits before the batch is sorted, so none completes meanwhile.
        answered = guard.opened - guard.cancelled - len(self.streams)
        admitted: set[int] = set()
        refused: set[int] = set()
        kept = []
        for event in events:
            stream_id: int = getattr(event, "stream_id", None) or 0  # 0: the connection
            if isinstance(event, RequestReceived):
                if guard.running + len(admitted) >= cap:
                    # h2 caps the streams open at once, so only a client that reset streams
                    # whose app calls still run gets here.
                    _refuse_stream(self.connection, stream_id)
                    refused.add(stream_id)
                    guard.refused += 1
                else:
                    admitted.add(stream_id)
                    guard.opened += 1
                    kept.append(event)
            elif stream_id in refused:
                if isinstance(event, DataReceived):
                    # What the refused stream's data took of the connection's window.
                    self.connection.acknowledge_received_data(
                        event.flow_controlled_length, stream_id
                    )
            else:
                if isinstance(event, StreamReset) and (
                    stream_id in admitted or stream_id in self.streams
                ):
                    guard.cancelled += 1
                kept.append(event)
            unfinished = guard.cancelled + guard.refused
            if unfinished >= cap and unfinished > answered:
                await _calm_down(self, guard.last_started, unfinished, answered)
                return
        await original_handle_events(self, kept)
        guard.last_started = max([guard.last_started, *admitted])

    return {H2_HANDLE_EVENTS: _handle_events}


def _fix_priority_signals() -> dict[Target, Callable[..., Any]]:
    """Fix 6: a PRIORITY frame for a stream without a send buffer breaks the connection.

    Upstream: no Hypercorn issue or pull request reports it (tracker searched 2026-12).
    This replaces H2Protocol._priority_updated as of 0.18.0, which inserts any stream a
    PRIORITY frame names into the tree the sending task walks:
    https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/protocol/h2.py#L300-L317
    and whose sending task fails on such a stream in _send_data's clean-up:
    https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/protocol/h2.py#L156-L180
    """

    async def _priority_updated(self: Any, event: Any) -> None:
        # RFC 9113 5.3.2: priority signals from RFC 7540 are deprecated; ignoring them
        # leaves every stream in the tree only while it has a send buffer.
        return None

    return {PRIORITY_UPDATED: _priority_updated}


def apply() -> None:
    """Check the installed Hypercorn (ConfigError if it is not the one), then patch it once."""
    check()
    server = PROTOCOL_SEND.owner()
    if getattr(server, "_secret_manager_fixed", False):
        return
    replacements = {
        **_fix_idle_shutdown_race(),
        **_fix_data_for_answered_streams(),
        **_fix_buffers_of_closed_connections(),
        **_fix_no_h2c(),
        **_fix_rapid_reset(),
        **_fix_priority_signals(),
    }
    for target, replacement in replacements.items():
        setattr(target.owner(), target.name, replacement)
    server._secret_manager_fixed = True
