"""Three fixes for Hypercorn 0.18, applied by ``secret-manager serve`` in every worker.

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

Applied only to the Hypercorn versions they were written against; anything else is left
alone with a warning, so an upgrade cannot be silently patched with code written for other
internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import ssl
from typing import Any

log = logging.getLogger("secret_manager.serve")

PATCHED_VERSIONS = ("0.18.",)


def apply() -> bool:
    """Patch Hypercorn's TCP server once; True if the fix is (now) in place."""
    from h2.errors import ErrorCodes
    from hypercorn.asyncio import tcp_server
    from hypercorn.events import Closed, RawData, Updated
    from hypercorn.protocol.h2 import H2Protocol

    server = tcp_server.TCPServer
    if getattr(server, "_secret_manager_fixed", False):
        return True
    version = importlib.metadata.version("hypercorn")
    if not version.startswith(PATCHED_VERSIONS):
        log.warning(
            "hypercorn %s: the shutdown race fix (written for %s) is not applied",
            version,
            ", ".join(v + "x" for v in PATCHED_VERSIONS),
        )
        return False

    original_protocol_send = server.protocol_send

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
                data = await asyncio.wait_for(
                    self.reader.read(tcp_server.MAX_RECV), self.config.read_timeout
                )
            except (ConnectionError, OSError, TimeoutError, ssl.SSLError):
                break
            if getattr(self, "_secret_manager_closing", False):
                break  # the server is closing this idle connection: nothing new is served
            await self.protocol.handle(RawData(data))
        await self.protocol.handle(Closed())

    original_close_stream = H2Protocol._close_stream

    async def _close_stream(self: Any, stream_id: int) -> None:
        await original_close_stream(self, stream_id)
        h2_stream = self.connection.streams.get(stream_id)
        if h2_stream is not None and not h2_stream.closed and not self.closed:
            # Answered while the client still sends: ask it to stop, without an error.
            self.connection.reset_stream(stream_id, error_code=ErrorCodes.NO_ERROR)
            await self._flush()

    original_h2_handle = H2Protocol.handle

    async def handle(self: Any, event: Any) -> None:
        await original_h2_handle(self, event)
        if isinstance(event, Closed):
            # The sending task stops with the connection: release every stream still
            # waiting for its buffer to drain, or its app task (and the connection) hangs.
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()

    H2Protocol._close_stream = _close_stream  # type: ignore[method-assign]
    H2Protocol.handle = handle  # type: ignore[method-assign]
    server.protocol_send = protocol_send  # type: ignore[method-assign]
    server._idle_timeout = _idle_timeout  # type: ignore[method-assign]
    server._read_data = _read_data  # type: ignore[method-assign]
    server._secret_manager_fixed = True  # type: ignore[attr-defined]
    return True
