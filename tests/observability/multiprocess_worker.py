"""A stand-in for one Hypercorn worker, run as a subprocess by test_metrics.py.

``record N``: add N created secrets and one store call carrying N audit records, then exit.
``keep-own-files N DIR``: record N, then run prepare_multiprocess_dir(DIR) and record 1 more.
``scrape DIR``: print what GET /metrics answers when it aggregates the files in DIR.
PROMETHEUS_MULTIPROC_DIR is set by the caller before this process imports prometheus_client.
"""

from __future__ import annotations

import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from observability.metrics import (
    SECRETS_CREATED,
    STORE_BATCH_SIZE,
    metrics_app,
    prepare_multiprocess_dir,
)


def record(count: int) -> None:
    for _ in range(count):
        SECRETS_CREATED.inc()
    STORE_BATCH_SIZE.labels("insert_audit").observe(count)


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "record":
        record(int(args[0]))
    elif command == "keep-own-files":
        record(int(args[0]))
        prepare_multiprocess_dir(Path(args[1]))
        record(1)
    elif command == "scrape":
        app = Starlette(routes=[Route("/metrics", metrics_app(multiprocess_dir=Path(args[0])))])
        with TestClient(app) as client:
            response = client.get("/metrics")
        response.raise_for_status()
        sys.stdout.write(response.text)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
