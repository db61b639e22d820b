"""``export`` and ``import``: the store's records, sealed as stored, to a file and back.

The work is vault/transfer.py's; this module checks the settings, names the file, shows
progress on a terminal and prints the one-line summary.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vault.backend import backend_for
from vault.cli.common import fail
from vault.errors import ConfigError, TransferRefused
from vault.settings import Settings
from vault.stores.base import Backend

if TYPE_CHECKING:
    from vault.transfer import Counts


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``export`` and ``import``, and their options."""
    export_cmd = commands.add_parser(
        "export", help="write the store's records, sealed as stored, to a file (no key needed)"
    )
    export_cmd.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write to FILE (default: standard output)"
    )
    export_cmd.add_argument("--audit", action="store_true", help="include the audit log")
    export_cmd.set_defaults(run=export_command)

    import_cmd = commands.add_parser(
        "import", help="add the records of an export file to the store (no key needed)"
    )
    import_cmd.add_argument(
        "-i", "--input", type=Path, metavar="FILE", help="read FILE (default: standard input)"
    )
    import_cmd.set_defaults(run=import_command)


@contextlib.contextmanager
def _progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Records, rate and time left on standard error, while it is a terminal."""
    if not sys.stderr.isatty():
        yield lambda done: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=description,
        unit=" records",
        unit_scale=True,
        file=sys.stderr,
        leave=False,  # the summary line stays, the bar goes
        mininterval=0.5,
    ) as bar:

        def advance(done: int) -> None:
            bar.update(done)

        yield advance


def _configured() -> tuple[Settings, Backend]:
    settings = Settings.from_env()
    backend = backend_for(settings)
    backend.check()
    return settings, backend


def export_command(args: argparse.Namespace) -> int:
    """Write the store's live records, sealed, to --output or standard output."""
    from vault import transfer

    try:
        settings, backend = _configured()
    except ConfigError as exc:
        return fail(str(exc))
    if args.output is None and sys.stdout.isatty():
        return fail(
            "export: standard output is a terminal: give --output FILE, or pipe it "
            "(secret-manager export | secret-manager import)"
        )
    try:
        store = backend.open_bulk(create=False)
    except FileNotFoundError:
        return fail(
            f"export: DATA_DIR={str(settings.data_dir)!r} holds no vault.db: run export with "
            "the server's DATA_DIR (or its MONGO_URI)"
        )
    except transfer.failures() as exc:
        return fail(f"export: cannot open the store: {exc}")
    name = "standard output" if args.output is None else str(args.output)
    partial = None if args.output is None else args.output.with_name(args.output.name + ".partial")
    write = functools.partial(
        transfer.export, store, audit=args.audit, store_kind=backend.kind, bar=_progress
    )
    started = time.perf_counter()
    try:
        if partial is None:
            counts = write(sys.stdout.buffer)
        else:
            # Written beside the target and renamed when whole: a backup file that exists is
            # complete, and readable by this user only (it holds every sealed secret).
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                counts = write(out)
                os.fsync(out.fileno())
            os.replace(partial, args.output)
    except TransferRefused as exc:
        if partial is not None:
            partial.unlink(missing_ok=True)
        return fail(f"export: refused: {exc}; nothing was written")
    except transfer.failures() as exc:
        if partial is not None:
            partial.unlink(missing_ok=True)
        print(f"secret-manager: export to {name} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(
        f"secret-manager: exported {_plural(counts.secrets, 'secret')} and "
        f"{_plural(counts.audit, 'audit record')} "
        f"from {store.label} to {name} in {transfer.elapsed_since(started)} "
        f"({counts.left_out} expired or used up, left out); {_receipts_out(counts)}SHA-256 "
        f"{counts.sha256}",
        file=sys.stderr,
    )
    return 0


def _receipts_out(counts: Counts) -> str:
    """What the export's summary says of receipts: how many, and any left out."""
    said = _plural(counts.receipts, "receipt")
    if counts.receipts_left_out:
        said += f" ({counts.receipts_left_out} not whole, left out)"
    return said + "; "


# Conflicts named one per line, up to this many; the summary gives their number.
_CONFLICTS_SHOWN = 20


def import_command(args: argparse.Namespace) -> int:
    """Check a file from export whole, then add its records to the configured store."""
    from vault import transfer

    try:
        settings, backend = _configured()
        backend.check_writable(create=False)
    except ConfigError as exc:
        return fail(str(exc))
    if args.input is None and sys.stdin.isatty():
        return fail(
            "import: standard input is a terminal: give --input FILE, or pipe an export into it"
        )
    name = "standard input" if args.input is None else str(args.input)
    try:
        source = sys.stdin.buffer if args.input is None else args.input.open("rb")
    except OSError as exc:
        return fail(f"import: cannot read {name}: {exc.strerror}")
    conflicts = 0

    def conflict(line: int) -> None:
        nonlocal conflicts
        conflicts += 1
        if conflicts <= _CONFLICTS_SHOWN:
            print(
                f"secret-manager: import: conflict at line {line} of {name}: the store holds "
                "a different secret under that record's key; left it untouched",
                file=sys.stderr,
            )

    started = time.perf_counter()
    try:
        counts = transfer.import_(
            functools.partial(backend.open_bulk, create=True),
            source,
            bar=_progress,
            conflict=conflict,
            known_readers=settings.api_keys.names_in if settings.api_keys else None,
        )
    except TransferRefused as exc:
        return fail(f"import: refused {name}: {exc}; nothing was written")
    except transfer.failures() as exc:
        print(
            f"secret-manager: import from {name} stopped: {exc}; the records written so far "
            "stay, and importing the file again carries on where this stopped",
            file=sys.stderr,
        )
        return 1
    finally:
        source.close()
    took = transfer.elapsed_since(started)
    print(_imported(name, counts, took, api_keys=bool(settings.api_keys)), file=sys.stderr)
    return 1 if counts.conflicts else 0


def _imported(name: str, counts: Counts, took: str, *, api_keys: bool) -> str:
    """The import's summary line."""
    line = (
        f"secret-manager: imported {name} into {counts.store} in {took}: secrets "
        f"{counts.new} new, {counts.present} already there, {counts.fewer_reads} with fewer "
        f"reads left, {_more_failures(counts.more_failures)}{counts.left_out} expired since "
        f"the export, {counts.conflicts} "
        f"conflicts; audit records {counts.audit_new} new, "
        f"{counts.audit - counts.audit_new} already there; receipts {counts.receipts_new} new, "
        f"{counts.receipts - counts.receipts_new} already there"
    )
    if counts.keyed_by_id:
        line += (
            f"; {_plural(counts.keyed_by_id, 'new secret')} from this format 1 file "
            "stored under their secret id: run secret-manager rewrap to convert them"
        )
    if counts.unknown_readers:
        line += _unknown_readers(counts.unknown_readers, api_keys=api_keys)
    return line


def _more_failures(count: int) -> str:
    """The summary's clause for secrets whose wrong passphrase tries the file raised: only
    when there are any (an import of secrets without passphrases reads as before)."""
    return f"{count} with more wrong passphrase tries, " if count else ""


def _unknown_readers(count: int, *, api_keys: bool) -> str:
    """What the summary says of records naming readers no key of this server is."""
    one = count == 1
    secrets, it = _plural(count, "secret"), "it" if one else "them"
    stored = f"stored as {'it is' if one else 'they are'}"
    if not api_keys:
        return (
            f"; {secrets} {'is' if one else 'are'} for named readers and this server has no "
            f"API keys: {stored}, and only those readers' keys, once configured, fetch {it}"
        )
    return (
        f"; {secrets} {'names' if one else 'name'} readers that are no API key of "
        f"{'its' if one else 'their'} tenant here: {stored}, and a reader fetches {it} "
        "once its key is configured"
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
