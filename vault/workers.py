"""``serve --workers N``: N Hypercorn worker processes under a supervisor that drains them all.

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
"""

from __future__ import annotations

import logging
import signal
import time
from multiprocessing import get_context
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from hypercorn.config import Config, Sockets

log = logging.getLogger("secret_manager.workers")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Beyond the graceful timeout: lifespan shutdown (the audit flush) and interpreter exit.
EXIT_MARGIN_SECONDS = 5.0


def serve_workers(config: Config, count: int) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; 0 after a clean stop, 1 if one died."""
    from hypercorn.asyncio.run import asyncio_worker

    if count < 2:
        raise ValueError("serve_workers is for two or more workers")
    context = get_context("spawn")
    sockets = config.create_sockets()
    shutdown = context.Event()
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        shutdown.set()

    # Workers inherit these ignored signals (a handler would not survive the spawn).
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in STOP_SIGNALS}
    alive: list[BaseProcess] = []
    try:
        for _ in range(count):
            process: BaseProcess = context.Process(
                target=asyncio_worker,
                kwargs={"config": config, "sockets": sockets, "shutdown_event": shutdown},
            )
            process.start()
            alive.append(process)
        # The workers hold the listening sockets now; ours would keep the port accepting
        # connections into the backlog after every worker has stopped listening.
        _close(sockets)
        for number in STOP_SIGNALS:
            signal.signal(number, stop)

        exitcode = 0
        deadline: float | None = None
        while alive:
            wait([worker.sentinel for worker in alive], timeout=0.5)
            for worker in [worker for worker in alive if worker.exitcode is not None]:
                worker.join()
                alive.remove(worker)
                if not stopping:
                    log.error(
                        "worker %s exited with code %s: stopping the others",
                        worker.pid,
                        worker.exitcode,
                    )
                    stopping = True
                    shutdown.set()
                elif worker.exitcode != 0:
                    log.error("worker %s exited with code %s", worker.pid, worker.exitcode)
                else:
                    continue
                exitcode = 1
            if stopping and deadline is None:
                deadline = time.monotonic() + config.graceful_timeout + EXIT_MARGIN_SECONDS
            if deadline is not None and time.monotonic() > deadline and alive:
                log.error("%d workers did not stop in time: killing them", len(alive))
                for worker in alive:
                    worker.kill()
                exitcode = 1
                deadline = None  # killed: the next wait reaps them
        return exitcode
    finally:
        for worker in alive:  # only on an error of ours above: never leave orphans
            worker.kill()
            worker.join()
        for number, handler in previous.items():
            signal.signal(number, handler)
        _close(sockets)


def _close(sockets: Sockets) -> None:
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.close()
