"""``create``, ``fetch``, ``delete`` and ``status``: the command line's side of vault.client.

Each command makes one call through ``vault.client.Client`` (its retries, its idempotency
key, its typed errors) and prints the server's JSON answer (its object, every field in its
order) on one line, which scripts read; an error is one line on standard error and exit
status 1, a setting that cannot be used one line and exit status 2. The commands hand the
client the body they build (``create`` forwards the base64 text it was given, so the
server, not the command, judges it) and print the answer, so they call the client's
``_call`` below its typed methods.

A passphrase is read from a file (``--passphrase-file``), never taken as an argument: an
argument stays in the shell's history and is shown to every user by ``ps``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from vault.cli.common import fail
from vault.client import (
    CREATE,
    DELETE,
    FETCH,
    STATUS,
    Client,
    ClientError,
    ConfigurationError,
    _create_body,
    _fetch_body,
    _Operation,
)
from vault.errors import ConfigError
from vault.settings import client_token, client_url


class _RefusePassphrase(argparse.Action):
    """``--passphrase``, refused without quoting its value: a passphrase in the command
    line stays in the shell's history. Declared so that argparse never reads it as an
    abbreviation of ``--passphrase-file``, whose error would then name the passphrase as
    the file it could not read."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> NoReturn:
        parser.error(
            "--passphrase is not taken on the command line, where it would stay in the "
            "shell's history: put it in a file and give --passphrase-file FILE "
            "('-' reads standard input)"
        )


def _add_passphrase_file(command: argparse.ArgumentParser, meaning: str) -> None:
    command.add_argument("--passphrase-file", metavar="FILE", help=meaning)
    command.add_argument(
        "--passphrase", nargs="?", action=_RefusePassphrase, help=argparse.SUPPRESS
    )


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``create``, ``fetch``, ``delete`` and ``status``, and their options."""
    default_url = client_url()
    create_cmd = commands.add_parser("create", help="store a secret, print the JSON answer")
    create_cmd.add_argument("secret", help="the secret, standard base64; '-' reads it from stdin")
    create_cmd.add_argument("--url", default=default_url, help=f"service URL ({default_url})")
    # Checked in create(), not by argparse, so a refusal is one line like every other one.
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
    create_cmd.add_argument(
        "--readers",
        metavar="NAMES",
        help="only these API keys of your tenant may fetch it, comma-separated: billing,web",
    )
    create_cmd.add_argument(
        "--receipt",
        action="store_true",
        help="answer a receipt_id too, for `status` to tell whether and when it was read",
    )
    create_cmd.add_argument(
        "--label",
        metavar="TEXT",
        help="your own note, shown by `status` (stored in clear: never the secret itself)",
    )
    _add_passphrase_file(
        create_cmd,
        "the secret can be fetched only with the passphrase in FILE ('-': standard input), "
        "its one trailing newline dropped; wrong tries are limited, then the secret is deleted",
    )
    create_cmd.set_defaults(run=create)

    fetch_cmd = commands.add_parser("fetch", help="print the secret stored under an id")
    fetch_cmd.add_argument("secret_id", help="the id printed by create")
    fetch_cmd.add_argument("--url", default=default_url, help=f"service URL ({default_url})")
    _add_passphrase_file(
        fetch_cmd,
        "the secret's passphrase, read from FILE ('-': standard input), its one trailing "
        "newline dropped; each wrong one counts towards the secret's deletion",
    )
    fetch_cmd.set_defaults(run=fetch)

    delete_cmd = commands.add_parser("delete", help="delete the secret stored under an id")
    delete_cmd.add_argument("secret_id", help="the id printed by create")
    delete_cmd.add_argument("--url", default=default_url, help=f"service URL ({default_url})")
    delete_cmd.set_defaults(run=delete)

    status_cmd = commands.add_parser(
        "status", help="print what became of a secret made with --receipt"
    )
    status_cmd.add_argument("receipt_id", help="the receipt_id printed by create --receipt")
    status_cmd.add_argument("--url", default=default_url, help=f"service URL ({default_url})")
    status_cmd.set_defaults(run=status)


# A duration: a whole number of seconds, or of minutes, hours or days with their unit. The
# sign is matched only to say "at least 1 second" rather than "not a duration".
_DURATION = re.compile(r"(-?)([0-9]+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``90``, ``90s``, ``15m``, ``2h`` or ``7d``; ValueError naming what is wanted.

    Only whole numbers of one unit, at least one second: anything else (``1.5h``, ``1h30m``,
    ``0``, ``-5m``) is refused here rather than sent for the server to interpret.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"--ttl must be a whole number of seconds, or of minutes, hours or days with their "
            f"unit, like 90, 90s, 15m, 2h or 7d; got {text!r}"
        )
    sign, digits, unit = match.groups()
    if sign or not digits.strip("0"):
        raise ValueError(f"--ttl must be at least 1 second, got {text!r}")
    try:
        number = int(digits)
    except ValueError:  # more digits than Python converts: no ttl is that long anyway
        raise ValueError(f"--ttl is far too long: {text[:20]}...") from None
    return number * _UNIT_SECONDS[unit]


def parse_max_reads(text: str) -> int:
    """A whole number of reads, at least 1; the server enforces its own maximum."""
    if not re.fullmatch(r"[0-9]+", text) or not text.strip("0"):
        raise ValueError(f"--max-reads must be a whole number of reads, at least 1; got {text!r}")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--max-reads is far too large: {text[:20]}...") from None


def read_passphrase(name: str) -> str:
    """The passphrase in file ``name`` (``-``: standard input), without its one trailing
    newline (``\n`` or ``\r\n``, as ``echo`` or an editor leaves it); any other whitespace
    is part of it. ValueError naming the file, never quoting what is in it, when it cannot
    be read, is not UTF-8 text or holds nothing else."""
    shown = "standard input" if name == "-" else name
    try:
        if name == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as file:
                data = file.read()
    except OSError as exc:
        raise ValueError(
            f"--passphrase-file: cannot read {shown}: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--passphrase-file: {shown} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
    if not text:
        raise ValueError(f"--passphrase-file: {shown} is empty; write the passphrase in it")
    return text


def call(url: str, op: _Operation, body: Mapping[str, Any]) -> int:
    """Send one call through the client; print its answer, or its error in one line."""
    if not url.startswith(("http://", "https://")):
        return fail(f"the URL (--url or SECRET_MANAGER_URL) must start with http://, got {url!r}")
    try:
        token = client_token()
    except ConfigError as exc:
        return fail(str(exc))
    try:
        # The token as read above (or none): the client reads no variable of its own here.
        client = Client(url, token, environ={})
    except ConfigurationError as exc:
        return fail(f"--url or SECRET_MANAGER_URL: {exc}")
    try:
        with client:
            answer = client._call(op, body).answer
    except ClientError as exc:
        print(f"secret-manager: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, ensure_ascii=False, separators=(",", ":")))
    return 0


def create(args: argparse.Namespace) -> int:
    """Store a secret; the options are checked before stdin is read or a request sent."""
    if args.secret == "-" and args.passphrase_file == "-":  # noqa: S105 - stdin, not a password
        return fail("the secret and --passphrase-file cannot both be read from standard input")
    try:
        ttl = None if args.ttl is None else parse_duration(args.ttl)
        max_reads = None if args.max_reads is None else parse_max_reads(args.max_reads)
        passphrase = None
        if args.passphrase_file is not None:
            passphrase = read_passphrase(args.passphrase_file)
    except ValueError as exc:
        return fail(str(exc))
    readers = None if args.readers is None else [n.strip() for n in args.readers.split(",")]
    text = sys.stdin.read() if args.secret == "-" else args.secret  # noqa: S105
    # `base64` wraps its output every 76 columns; whitespace is never part of the secret.
    body = _create_body(
        "".join(text.split()), ttl, max_reads, readers, args.receipt, args.label, passphrase
    )
    return call(args.url, CREATE, body)


def fetch(args: argparse.Namespace) -> int:
    """Print the secret stored under an id."""
    passphrase = None
    if args.passphrase_file is not None:
        try:
            passphrase = read_passphrase(args.passphrase_file)
        except ValueError as exc:
            return fail(str(exc))
    # The id goes in the body, never in the URL: it is a bearer capability.
    return call(args.url, FETCH, _fetch_body(args.secret_id, passphrase))


def delete(args: argparse.Namespace) -> int:
    """Delete the secret stored under an id."""
    return call(args.url, DELETE, {"secret_id": args.secret_id})


def status(args: argparse.Namespace) -> int:
    """Print what became of a secret made with a receipt; never spends a read."""
    return call(args.url, STATUS, {"receipt_id": args.receipt_id})
