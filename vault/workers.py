"""Running Hypercorn's workers on an app built from a value, and ``serve --workers N``: N
worker processes under a supervisor that drains them all.

Hypercorn's own workers import the app by a path ("module:factory()"), so the app could
only learn its settings from the environment. Here a worker is handed ``make_app``, a
picklable callable holding the settings ``serve`` validated once (spawned processes get it
in their start-up arguments), and runs Hypercorn's asyncio server on what it returns, on
uvloop's event loop where it is installed (a dependency everywhere but Windows), as
Hypercorn's own ``uvloop`` worker class does: the loop's own work per request (callbacks,
timers, socket reads and writes) then runs in C. Measured (docs/performance.md, "The event
loop: uvloop"): 4-9 % less CPU per request at one connection and per fetch at 20, none per
create at 20, and 12-20 % more per create at 100 connections; asyncio's own loop where
uvloop is not installed.

``serve_one`` and ``serve_workers`` both say in the log when a signal starts the graceful
shutdown and when it has ended, so an operator can tell a drain from a hang after "Running
on ...".

Hypercorn 0.18's own supervisor (``hypercorn.run.run``) has two faults this one does not:
- On SIGTERM it sets the shared shutdown event, then wakes as soon as the *first* worker
  has exited and SIGTERMs the rest: a worker still finishing a request is killed with it
  (the request was read, perhaps processed, and never answered).
- When a worker dies (a crash, the OOM killer) it stops the others and returns the exit
  code of the last one it joined, usually 0: a supervisor that restarts on failure
  (systemd ``Restart=on-failure``) would leave the service down.

Here every worker stops on the shared event alone (they ignore SIGINT and SIGTERM, which a
terminal or a process manager may send to the whole group), the supervisor waits for all
of them up to the graceful timeout plus a margin, and a worker that exits before shutdown
was asked for stops the others gracefully and makes the server exit 1.

SIGHUP re-reads the API key file (vault/app.py installs the handler on each worker's event
loop, once its app has started): the supervisor passes the signal on to every worker, and
until a worker's handler is in place the signal is ignored there (its app reads the file
when the handler is installed, so nothing is missed). Hypercorn gives SIGHUP no meaning in
the worker this module runs (a worker given a shutdown trigger installs no signal handler)
and the default action would end the process; Hypercorn's own supervisor restarts every
worker on SIGHUP, which this one does not.

Two more guarantees an operator relies on when restarting the service:
- **Workers never outlive the supervisor.** Each worker holds the read end of a pipe whose
  only write end the supervisor holds. However the supervisor dies (SIGKILL included), the
  kernel closes that end, and a thread in each worker that waits on the pipe sees
  end-of-file and starts the worker's graceful shutdown: in-flight requests finish (up to
  the graceful timeout) and pending audit records are written. A pipe was chosen over
  ``prctl(PR_SET_PDEATHSIG)``: it is portable, and its end-of-file leads to the same drain
  as SIGTERM, where a death signal would either kill the worker mid-request (SIGKILL) or be
  ignored (the workers ignore SIGTERM and SIGINT, see above). A worker still running
  ``graceful_timeout`` + ``EXIT_MARGIN_SECONDS`` later exits anyway, as the supervisor
  would have killed it.
- **No silent port sharing.** The supervisor binds each address once, without
  ``SO_REUSEPORT`` (Hypercorn sets it whenever ``workers > 1``), and the workers inherit
  that one socket. A second server on a held address then fails to bind ("Address already
  in use", exit 2 from ``serve``) instead of having the kernel split connections between
  the old server and the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import os
import queue
import signal
import ssl
import threading
import time
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any, cast

from hypercorn.config import Config, Sockets
from starlette.types import ASGIApp

log = logging.getLogger("secret_manager.workers")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELOAD_SIGNAL = signal.SIGHUP
# Beyond the graceful timeout: lifespan shutdown (the audit flush) and interpreter exit.
EXIT_MARGIN_SECONDS = 5.0


class _Drain:
    """The log lines of a graceful shutdown: the signal that started it, then that it ended.

    The signal handler only notes the signal; a thread writes the line, as a handler that
    logged could cut into a line the interrupted code was writing. They meet on a
    SimpleQueue, whose put is safe in a signal handler; never on the shared shutdown event,
    whose waiters a worker's set() waits for (a killed supervisor would block it for good).
    """

    def __init__(self, what: str, graceful_timeout: float) -> None:
        self._what = what  # "shutting down" or "stopping 4 workers"
        self._graceful_timeout = graceful_timeout
        self._signal: str | None = None
        self._since = 0.0
        self._news: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._announcer = threading.Thread(target=self._announce, name="drain-log", daemon=True)
        self._announcer.start()

    def signalled(self, signum: int) -> None:
        """From a signal handler: note the first signal (the one that started the drain)."""
        if self._signal is None:
            self._signal = signal.Signals(signum).name
            self._since = time.monotonic()
            self._news.put(self._signal)

    def _announce(self) -> None:
        name = self._news.get()
        if name is not None:
            log.info(
                "%s received: %s; no new connections, requests in flight have up to %gs to finish",
                name,
                self._what,
                self._graceful_timeout,
            )

    def stopped(self, exitcode: int) -> None:
        """The server has stopped: every worker is gone and the audit log flushed."""
        self._news.put(None)  # it may have stopped by itself: let the announcer go
        self._announcer.join()
        if self._signal is None:
            log.info("stopped, exit status %d", exitcode)
        else:
            took = time.monotonic() - self._since
            log.info("stopped %.1fs after %s, exit status %d", took, self._signal, exitcode)


def serve_one(make_app: Callable[[], ASGIApp], config: Config) -> int:
    """One worker, in this process, until SIGTERM/SIGINT, with the shutdown's log lines; 0
    after a clean stop."""
    sockets = config.create_sockets()  # before the app is built: a busy port fails first
    shutdown = threading.Event()
    drain = _Drain("shutting down", config.graceful_timeout)

    def stop(signum: int, frame: FrameType | None) -> None:
        drain.signalled(signum)
        shutdown.set()  # safe here: the worker only ever reads it (is_set)

    # Instead of Hypercorn's own handlers, which would set its event unseen. Its worker only
    # polls is_set(), which a threading.Event has as well as a multiprocessing one.
    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    # Until the app's lifespan installs its own handler (vault/app.py), rather than die.
    previous[RELOAD_SIGNAL] = signal.signal(RELOAD_SIGNAL, signal.SIG_IGN)
    try:
        run_worker(make_app, config, sockets, cast(Event, shutdown))
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _close(sockets)
    drain.stopped(0)
    return 0


def run_worker(
    make_app: Callable[[], ASGIApp],
    config: Config,
    sockets: Sockets,
    shutdown: Event | None = None,
) -> None:
    """Hypercorn's asyncio worker (``hypercorn.asyncio.run.asyncio_worker``), serving the app
    ``make_app`` builds rather than one imported by ``config.application_path``."""
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.typing import ASGIFramework
    from hypercorn.utils import check_multiprocess_shutdown_event, wrap_app

    # cast: Hypercorn types scopes as TypedDicts where Starlette has plain mappings.
    app = wrap_app(cast(ASGIFramework, make_app()), config.wsgi_max_body_size, "asgi")
    trigger = (
        None
        if shutdown is None
        else functools.partial(check_multiprocess_shutdown_event, shutdown, asyncio.sleep)
    )
    with asyncio.Runner(debug=config.debug, loop_factory=_loop_factory()) as runner:
        runner.get_loop().set_exception_handler(_ignore_failed_handshakes)
        runner.run(worker_serve(app, config, sockets=sockets, shutdown_trigger=trigger))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed; None (asyncio's own) elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - installed wherever the package installs it
        return None
    return uvloop.new_event_loop


def _ignore_failed_handshakes(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # As Hypercorn's worker does: a client's failed TLS handshake is not the server's error.
    if not isinstance(context.get("exception"), ssl.SSLError):
        loop.default_exception_handler(context)


class _Supervisor:
    """The running workers, and what their ends mean: a stop asked for, or a worker dead."""

    def __init__(self, config: Config, shutdown: Event, drain: _Drain) -> None:
        self.config = config
        self.shutdown = shutdown
        self.drain = drain
        self.alive: list[BaseProcess] = []
        self.stopping = False
        self.exitcode = 0

    def stop(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: every worker drains (the shared event), then exits."""
        self.stopping = True
        self.drain.signalled(signum)
        self.shutdown.set()

    def reload(self, signum: int, frame: FrameType | None) -> None:
        """SIGHUP: pass it on to every worker, which re-reads the API key file."""
        for worker in self.alive:
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # it has just exited
                    os.kill(worker.pid, signum)

    def _reap(self) -> None:
        for worker in [worker for worker in self.alive if worker.exitcode is not None]:
            worker.join()
            self.alive.remove(worker)
            if not self.stopping:
                log.error(
                    "worker %s exited with code %s: stopping the others",
                    worker.pid,
                    worker.exitcode,
                )
                self.stopping = True
                self.shutdown.set()
            elif worker.exitcode != 0:
                log.error("worker %s exited with code %s", worker.pid, worker.exitcode)
            else:
                continue
            self.exitcode = 1

    def supervise(self) -> int:
        """Wait for every worker to end; kill those still running a graceful timeout (and
        the exit margin) after the stop began. 0 after a clean stop, 1 if one died."""
        deadline: float | None = None
        while self.alive:
            wait([worker.sentinel for worker in self.alive], timeout=0.5)
            self._reap()
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.config.graceful_timeout + EXIT_MARGIN_SECONDS
            if deadline is not None and time.monotonic() > deadline and self.alive:
                log.error("%d workers did not stop in time: killing them", len(self.alive))
                for worker in self.alive:
                    worker.kill()
                self.exitcode = 1
                deadline = None  # killed: the next wait reaps them
        self.drain.stopped(self.exitcode)
        return self.exitcode


def serve_workers(make_app: Callable[[], ASGIApp], config: Config, count: int) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; 0 after a clean stop, 1 if one died."""
    if count < 2:
        raise ValueError("serve_workers is for two or more workers")
    context = get_context("spawn")
    sockets = _bind(config)
    # Only this process ever holds the write end: its death is the workers' end-of-file.
    parent_gone, parent_alive = context.Pipe(duplex=False)
    supervisor = _Supervisor(
        config, context.Event(), _Drain(f"stopping {count} workers", config.graceful_timeout)
    )
    # Workers inherit these ignored signals (a handler would not survive the spawn); SIGHUP
    # stays ignored in a worker until its app installs its own handler.
    previous = {
        number: signal.signal(number, signal.SIG_IGN) for number in (*STOP_SIGNALS, RELOAD_SIGNAL)
    }
    try:
        for _ in range(count):
            process: BaseProcess = context.Process(
                target=_worker,
                kwargs={
                    "make_app": make_app,
                    "config": config,
                    "sockets": sockets,
                    "shutdown": supervisor.shutdown,
                    "parent_gone": parent_gone,
                },
            )
            process.start()
            supervisor.alive.append(process)
        # The workers hold the listening sockets now; ours would keep the port accepting
        # connections into the backlog after every worker has stopped listening.
        _close(sockets)
        parent_gone.close()
        for number in STOP_SIGNALS:
            signal.signal(number, supervisor.stop)
        signal.signal(RELOAD_SIGNAL, supervisor.reload)
        return supervisor.supervise()
    finally:
        for worker in supervisor.alive:  # only on an error of ours above: never leave orphans
            worker.kill()
            worker.join()
        for number, handler in previous.items():
            signal.signal(number, handler)
        _close(sockets)
        parent_gone.close()
        parent_alive.close()


def _bind(config: Config) -> Sockets:
    """Bind every address once, without ``SO_REUSEPORT``, for all the workers to share.

    Hypercorn's ``create_sockets`` sets ``SO_REUSEPORT`` when ``config.workers > 1``; with it
    a second server on the same port binds as well and the kernel splits connections
    between the two. One socket inherited by every worker needs no such option.
    """
    single = copy.copy(config)
    single.workers = 1
    return single.create_sockets()


def _worker(
    make_app: Callable[[], ASGIApp],
    config: Config,
    sockets: Sockets,
    shutdown: Event,
    parent_gone: Connection,
) -> None:
    """One worker process: Hypercorn's asyncio worker, also stopped by the supervisor's death."""
    threading.Thread(
        target=_watch_parent,
        args=(parent_gone, shutdown, config.graceful_timeout + EXIT_MARGIN_SECONDS),
        name="watch-supervisor",
        daemon=True,  # it must not keep a worker that has stopped from exiting
    ).start()
    run_worker(make_app, config, sockets, shutdown)


def _watch_parent(parent_gone: Connection, shutdown: Event, limit: float) -> None:
    """Wait for the supervisor's end of the pipe to close, then stop this worker gracefully.

    Nothing is ever sent on the pipe: ``recv_bytes`` returns only with end-of-file, when
    the supervisor has exited (after its workers, normally) or died.
    """
    with contextlib.suppress(EOFError, OSError):
        parent_gone.recv_bytes()
    log.warning("worker %s: the supervisor is gone, shutting down", os.getpid())
    # Armed before the event is set: a supervisor killed while holding the event's lock
    # would leave set() (and the worker's own polling of it) blocked for good.
    deadline = threading.Timer(limit, _exit_late, args=(limit,))
    deadline.daemon = True
    deadline.start()
    shutdown.set()  # the same graceful path as SIGTERM to the supervisor


def _exit_late(limit: float) -> None:
    """Leave without the supervisor that would have killed a worker this slow to stop."""
    log.error("worker %s did not stop within %.0fs of its supervisor: exiting", os.getpid(), limit)
    os._exit(1)


def _close(sockets: Sockets) -> None:
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.close()
