"""The ``secret-manager`` command: serve, genkey, rewrap, and the create/fetch/delete client.

One module per job: ``serve`` (checks, then Hypercorn), ``admin`` (audit-hash, rewrap),
``transfer`` (export, import) and ``client`` (create, fetch, delete); ``common`` holds the
refusal and the store checks they share. This module assembles the parser and dispatches.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from vault.cli.admin import audit_hash, rewrap
from vault.cli.client import create, post
from vault.cli.common import EXIT_CONFIG, positive
from vault.cli.serve import serve
from vault.cli.transfer import export_command, import_command
from vault.crypto import generate_key
from vault.settings import client_url


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (like every other refusal) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="secret-manager",
        description="Store secrets encrypted with AES-256-GCM and hand them back by id.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_cmd = commands.add_parser("serve", help="run the HTTP service on Hypercorn")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    serve_cmd.add_argument(
        "--workers",
        type=positive,
        default=1,
        help="worker processes (1; on Swarm, scale replicas instead)",
    )
    serve_cmd.add_argument(
        "--dev",
        action="store_true",
        help="with no key configured, keep a generated key in DATA_DIR/master.key (laptops only)",
    )

    commands.add_parser("genkey", help="print a new random master key (base64 of 32 bytes)")

    hash_cmd = commands.add_parser(
        "audit-hash", help="print how a secret id appears in the audit log (its HMAC)"
    )
    hash_cmd.add_argument("secret_id", help="the secret id to look for")
    hash_cmd.add_argument(
        "--dev", action="store_true", help="use DATA_DIR/master.key, as `serve --dev` does"
    )

    rewrap_cmd = commands.add_parser(
        "rewrap",
        help="re-encrypt every record sealed by a previous key under MASTER_KEY (key rotation)",
    )
    rewrap_cmd.add_argument(
        "--batch-size", type=positive, default=500, help="records per batch (500)"
    )
    rewrap_cmd.add_argument(
        "--max-batches",
        type=positive,
        default=None,
        help="stop after this many batches; the next run continues (default: no limit)",
    )
    rewrap_cmd.add_argument(
        "--dry-run", action="store_true", help="only count and check the records, write nothing"
    )
    rewrap_cmd.add_argument(
        "--dev", action="store_true", help="use DATA_DIR/master.key, as `serve --dev` does"
    )

    export_cmd = commands.add_parser(
        "export", help="write the store's records, sealed as stored, to a file (no key needed)"
    )
    export_cmd.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write to FILE (default: standard output)"
    )
    export_cmd.add_argument("--audit", action="store_true", help="include the audit log")

    import_cmd = commands.add_parser(
        "import", help="add the records of an export file to the store (no key needed)"
    )
    import_cmd.add_argument(
        "-i", "--input", type=Path, metavar="FILE", help="read FILE (default: standard input)"
    )

    default_url = client_url()
    create_cmd = commands.add_parser("create", help="store a secret, print the JSON answer")
    create_cmd.add_argument("secret", help="the secret, standard base64; '-' reads it from stdin")
    create_cmd.add_argument("--url", default=default_url, help=f"service URL ({default_url})")
    # Checked in main(), not by argparse, so a refusal is one line like every other one.
    create_cmd.add_argument(
        "--ttl",
        metavar="DURATION",
        help="the secret expires this long after it is stored: 90 or 90s, 15m, 2h, 7d "
        "(default: the server's SECRET_DEFAULT_TTL_SECONDS, normally never)",
    )
    create_cmd.add_argument(
        "--max-reads",
        metavar="N",
        help="the secret is deleted by its Nth fetch (default: no limit)",
    )

    fetch_cmd = commands.add_parser("fetch", help="print the secret stored under an id")
    fetch_cmd.add_argument("secret_id", help="the id printed by create")
    fetch_cmd.add_argument("--url", default=default_url, help=f"service URL ({default_url})")

    delete_cmd = commands.add_parser("delete", help="delete the secret stored under an id")
    delete_cmd.add_argument("secret_id", help="the id printed by create")
    delete_cmd.add_argument("--url", default=default_url, help=f"service URL ({default_url})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m vault``."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "genkey":
        print(generate_key())
        return 0
    if args.command == "audit-hash":
        return audit_hash(args)
    if args.command == "rewrap":
        return rewrap(args)
    if args.command == "export":
        return export_command(args)
    if args.command == "import":
        return import_command(args)
    if args.command == "create":
        return create(args)
    if args.command == "delete":
        # The id goes in the body, never in the URL: it is a bearer capability.
        return post(args.url, "/vault/secret/delete", {"secret_id": args.secret_id})
    return post(args.url, "/vault/secret/fetch", {"secret_id": args.secret_id})
