"""The ``secret-manager`` command: serve, genkey, rewrap, and the create/fetch/delete/status
client.

One module per job: ``serve`` (checks, then Hypercorn), ``admin`` (genkey, audit-hash,
rewrap), ``transfer`` (export, import) and ``client`` (create, fetch, delete, status, on
vault.client); ``common`` holds the refusal and the store checks they share. Each module
adds its own subcommands to the parser assembled here, with the function that runs each.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from vault.cli import admin, client, serve, transfer
from vault.cli.common import EXIT_CONFIG


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (like every other refusal) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order ``--help`` lists them; each sets ``run``."""
    parser = _Parser(
        prog="secret-manager",
        description="Store secrets encrypted with AES-256-GCM and hand them back by id.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (serve, admin, transfer, client):
        module.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m vault``."""
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status
