"""The ``secret-manager`` command: serve, genkey, rewrap, and the create/fetch/delete client.

Start-up problems a user can fix (a missing key, a malformed variable, a busy port, a
Hypercorn release other than the one vault/hypercorn_fixes.py is written for) end with one
line naming the cause and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.client
import json
import logging
import os
import re
import shutil
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from observability.metrics import prepare_multiprocess_dir
from vault.app import audit_hmac_key, audit_hmac_keys, build_keyring, build_store
from vault.crypto import generate_key, key_id, secret_id_hmac
from vault.keyguard import describe, dev_refusal, refusal, refused
from vault.settings import ConfigError, Settings, client_token, client_url
from vault.validation import InvalidValue, normalize_secret_id

log = logging.getLogger("secret_manager.cli")

EXIT_CONFIG = 2


def _fail(message: str) -> int:
    print(f"secret-manager: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _dev_key(path: Path) -> Path:
    """Load or create the development key file (mode 0600) and say loudly what it is."""
    if not path.exists():
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(generate_key() + "\n")
        except OSError as exc:
            raise ConfigError(
                f"--dev cannot write its key to {str(path)!r} (DATA_DIR): {exc.strerror}"
            ) from None
        log.warning("--dev: generated a new master key in %s", path)
    log.warning(
        "DEVELOPMENT MODE: the master key is stored unprotected in %s; anyone who can read "
        "it can decrypt every secret. Never use --dev in production: set MASTER_KEY_FILE.",
        path,
    )
    return path


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> str:
    # Called by OpenSSL for an encrypted key: refuse, instead of a prompt that would hang a
    # server started from a terminal (or read a passphrase in clear from one).
    raise _EncryptedKey


def _check_tls(certfile: Path, keyfile: Path) -> None:
    """Load the pair as Hypercorn will, so a bad one is one line naming the variables."""
    where = f"TLS_CERT_FILE={str(certfile)!r} and TLS_KEY_FILE={str(keyfile)!r}"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            certfile, keyfile, password=_no_passphrase
        )
    except _EncryptedKey:
        raise ConfigError(
            f"TLS_KEY_FILE={str(keyfile)!r} is encrypted: give serve an unencrypted key "
            "(a Docker secret, readable by the service only)"
        ) from None
    except ssl.SSLError as exc:
        # OpenSSL's reason (KEY_VALUES_MISMATCH, PEM lib, ...): never any of the key itself.
        reason = exc.reason or "not a PEM certificate chain and private key"
        raise ConfigError(
            f"{where} cannot be used together ({reason}): the certificate chain and its "
            "private key, both PEM"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None


def _check_data_dir(settings: Settings) -> None:
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"DATA_DIR={str(data_dir)!r} cannot be created: {exc.strerror}") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"DATA_DIR={str(data_dir)!r} is not writable by this user")


def _check_data_dir_creatable(settings: Settings) -> None:
    """Like _check_data_dir, without creating anything: an import checks its file before
    it writes even a directory."""
    data_dir = settings.data_dir.absolute()
    existing = next(path for path in (data_dir, *data_dir.parents) if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == data_dir else f"cannot be created in {existing}"
        raise ConfigError(f"DATA_DIR={str(settings.data_dir)!r} {what} by this user")


def _check_mongo_uri(uri: str) -> None:
    """Parse the URI the way pymongo will, without connecting; never echo its password."""
    from pymongo import MongoClient
    from pymongo.errors import ConfigurationError

    try:
        with warnings.catch_warnings():
            # pymongo only warns about an unknown option; a typo should stop start-up.
            warnings.simplefilter("error")
            MongoClient(uri, connect=False).close()
    except (ConfigurationError, UserWarning) as exc:
        message = str(exc)
        try:
            password = urllib.parse.urlsplit(uri).password
        except ValueError:
            password = None
        if password:
            message = message.replace(password, "***")
        raise ConfigError(
            f"MONGO_URI is not a usable MongoDB connection string: {message}"
        ) from None


def serve(args: argparse.Namespace) -> int:
    """Validate everything, then hand over to Hypercorn; SIGTERM/SIGINT drain it gracefully."""
    from observability.logging import configure_logging
    from vault import hypercorn_fixes

    try:
        # First: the fixes every worker applies are written for one Hypercorn release.
        hypercorn_fixes.check()
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        if settings.master_key is None and args.dev:
            if not settings.dev_key_path.exists():
                # Before a new key is written: a lost key file must not be replaced silently.
                _guard_fresh_dev_key(settings)
            key_path = _dev_key(settings.dev_key_path)
            # Hand the key to the workers (separate processes) the way production does.
            os.environ["MASTER_KEY_FILE"] = str(key_path)
            settings = Settings.from_env()
        keyring = build_keyring(settings)
        if settings.mongo_uri:
            _check_mongo_uri(settings.mongo_uri)
        else:
            _check_data_dir(settings)
        if settings.tls_certfile is not None and settings.tls_keyfile is not None:
            _check_tls(settings.tls_certfile, settings.tls_keyfile)
        _guard_keys(settings, keyring.key_ids, on_unchecked=_serve_unchecked)
    except ConfigError as exc:
        return _fail(str(exc))

    from hypercorn.config import Config

    from vault.workers import serve_one, serve_workers

    created_metrics_dir = _prepare_metrics_dir(settings, args.workers)
    config = Config()
    config.bind = [f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"]
    config.application_path = "vault.app:app_from_environment()"
    # One worker runs in this process; more are spawned processes, each loading the app.
    config.workers = 0 if args.workers == 1 else args.workers
    config.graceful_timeout = settings.graceful_timeout_seconds
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # Deliberate timeouts against slow clients: an idle keep-alive connection is closed
    # after KEEP_ALIVE_TIMEOUT_SECONDS, a connection that sends nothing for
    # READ_TIMEOUT_SECONDS after it opened or mid-request is dropped.
    config.keep_alive_timeout = settings.keep_alive_timeout_seconds
    config.read_timeout = settings.read_timeout_seconds
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        config.certfile = str(settings.tls_certfile)
        config.keyfile = str(settings.tls_keyfile)
        # Hypercorn's default is 60 s: a client that opens a connection and never completes
        # its handshake would hold it twelve times as long as an idle plain one.
        config.ssl_handshake_timeout = settings.read_timeout_seconds
    try:
        # More than one worker: our supervisor, which drains them all (vault/workers.py).
        return serve_one(config) if args.workers == 1 else serve_workers(config, args.workers)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    finally:
        if created_metrics_dir is not None:
            shutil.rmtree(created_metrics_dir, ignore_errors=True)


def _store_label(settings: Settings) -> str:
    """How the one-line refusals name the configured store."""
    if settings.mongo_uri:
        return f"MongoDB database {settings.mongo_db!r}"
    return f"SQLite file {str(settings.data_dir / 'vault.db')!r}"


def _unknown_key_counts(settings: Settings, known_key_ids: Collection[str]) -> dict[str, int]:
    """Open the configured store briefly and ask it which key ids, not in ``known_key_ids``,
    seal live records, and how many each (through the key id index). An SQLite file that
    does not exist yet holds none, and is not created here. Raises what the store raises
    when it cannot answer (StoreUnavailable), within the store's own timeouts."""
    if not settings.mongo_uri and not (settings.data_dir / "vault.db").is_file():
        return {}

    async def ask() -> dict[str, int]:
        store = build_store(settings)
        await store.open()
        try:
            return await store.unknown_key_counts(known_key_ids)
        finally:
            await store.close()

    return asyncio.run(ask())


def _serve_unchecked(reason: str) -> None:
    log.warning(
        "key check not run: the store could not be asked (%s); starting anyway. Records no "
        "configured key can open are reported by /readyz (records_unreadable) and the "
        "vault_records_unreadable metric once the store answers",
        reason,
    )


def _guard_keys(
    settings: Settings, configured: Collection[str], *, on_unchecked: Callable[[str], None]
) -> None:
    """The key guard before serve or rewrap starts: ConfigError, one line naming the key
    ids no configured key matches and the records each seals, unless every such id is in
    RETIRED_KEY_IDS. A store that cannot answer is left to ``on_unchecked``."""
    try:
        counts = _unknown_key_counts(settings, configured)
    except Exception as exc:  # down, refusing credentials, an unreadable file: not ours to judge
        on_unchecked(type(exc).__name__)
        return
    blocking = refused(counts, settings.retired_key_ids)
    if blocking:
        raise ConfigError(refusal(_store_label(settings), blocking, configured))
    if counts:
        log.warning(
            "starting although %s (RETIRED_KEY_IDS): no configured key opens them; a fetch "
            "of one answers 500",
            describe(counts),
        )


def _guard_fresh_dev_key(settings: Settings) -> None:
    """``serve --dev`` with no DATA_DIR/master.key: refuse to generate a new key when the
    store holds live records that neither it nor MASTER_KEY_PREVIOUS could open (the key
    file was deleted, or DATA_DIR points at another server's data)."""
    if settings.mongo_uri:
        _check_mongo_uri(settings.mongo_uri)
    previous = [key_id(key) for key in settings.previous_keys]
    try:
        counts = _unknown_key_counts(settings, previous)
    except Exception as exc:  # a new key is written all the same; the app counts later
        _serve_unchecked(type(exc).__name__)
        return
    blocking = refused(counts, settings.retired_key_ids)
    if blocking:
        raise ConfigError(dev_refusal(str(settings.dev_key_path), _store_label(settings), blocking))


def _prepare_metrics_dir(settings: Settings, workers: int) -> Path | None:
    """Give several workers one metrics directory, wiped of any earlier run's values.

    prometheus_client sums every worker's files on a scrape (multiprocess mode); without a
    directory each worker would report only its own counts. Returns the directory if it was
    created here (a temporary one, removed at exit).
    """
    if not settings.metrics_enabled:
        return None
    directory = settings.prometheus_multiproc_dir
    created = None
    if directory is None:
        if workers == 1:
            return None  # one process: plain in-memory metrics
        directory = created = Path(tempfile.mkdtemp(prefix="secret-manager-metrics-"))
    prepare_multiprocess_dir(directory)
    # The workers are spawned processes: they pick this up when they import the metrics.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return created


def audit_hash(args: argparse.Namespace) -> int:
    """The HMACs under which the audit log names a secret id: the active key's, then those of
    the previous master keys (records written before a rotation), one per line."""
    try:
        secret_id = normalize_secret_id(args.secret_id)
    except InvalidValue as exc:
        return _fail(str(exc))
    try:
        settings = Settings.from_env()
        if settings.master_key is None and settings.audit_hmac_key is None and args.dev:
            settings = Settings.from_env(
                {**os.environ, "MASTER_KEY_FILE": str(settings.dev_key_path)}
            )
        keys = audit_hmac_keys(settings)
    except ConfigError as exc:
        return _fail(str(exc))
    for key in keys:
        print(secret_id_hmac(key, secret_id))
    return 0


def rewrap(args: argparse.Namespace) -> int:
    """Re-encrypt under the active key every record a previous key sealed (key rotation)."""
    from vault.rewrap import EXIT_REMAINING, command

    try:
        settings = Settings.from_env()
        if settings.master_key is None and args.dev:
            settings = Settings.from_env(
                {**os.environ, "MASTER_KEY_FILE": str(settings.dev_key_path)}
            )
        keyring = build_keyring(settings)
        hash_key = audit_hmac_key(settings)
        if settings.mongo_uri:
            _check_mongo_uri(settings.mongo_uri)
            label = f"MongoDB database {settings.mongo_db!r}"
        else:
            database = settings.data_dir / "vault.db"
            if not database.is_file():
                # Opening it would create an empty store and report nothing to do.
                raise ConfigError(
                    f"DATA_DIR={str(settings.data_dir)!r} holds no vault.db: run rewrap with "
                    "the server's DATA_DIR (or its MONGO_URI)"
                )
            label = f"SQLite file {str(database)!r}"
        if not args.dry_run:
            # A dry run goes on: it writes nothing, and lists each such record by the
            # HMAC the audit log names it by, with the key id that sealed it.
            _guard_keys(settings, keyring.key_ids, on_unchecked=_rewrap_unchecked)
    except ConfigError as exc:
        return _fail(str(exc))
    except _NotAsked as exc:
        print(
            f"secret-manager: rewrap did not start: the store could not be asked ({exc}); "
            "nothing was written: run rewrap again once it answers",
            file=sys.stderr,
        )
        return EXIT_REMAINING
    return command(
        build_store(settings),
        keyring,
        store_label=label,
        hash_secret_id=functools.partial(secret_id_hmac, hash_key),
        batch_size=args.batch_size,
        dry_run=args.dry_run,
        max_batches=args.max_batches,
    )


class _NotAsked(Exception):
    """The key guard could not ask the store; the argument names the error's type."""


def _rewrap_unchecked(reason: str) -> None:
    # Unlike serve, rewrap can do nothing without the store, and a pass started now would
    # wait out the index build's long budget (prepare_rewrap) before saying so.
    raise _NotAsked(reason)


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


def _transfer_settings() -> Settings:
    settings = Settings.from_env()
    if settings.mongo_uri:
        _check_mongo_uri(settings.mongo_uri)
    return settings


def export_command(args: argparse.Namespace) -> int:
    """Write the store's live records, sealed, to --output or standard output."""
    from vault import transfer

    try:
        settings = _transfer_settings()
    except ConfigError as exc:
        return _fail(str(exc))
    if args.output is None and sys.stdout.isatty():
        return _fail(
            "export: standard output is a terminal: give --output FILE, or pipe it "
            "(secret-manager export | secret-manager import)"
        )
    try:
        store = transfer.open_bulk_store(settings, create=False)
    except FileNotFoundError:
        return _fail(
            f"export: DATA_DIR={str(settings.data_dir)!r} holds no vault.db: run export with "
            "the server's DATA_DIR (or its MONGO_URI)"
        )
    except transfer.failures() as exc:
        return _fail(f"export: cannot open the store: {exc}")
    name = "standard output" if args.output is None else str(args.output)
    partial = None if args.output is None else args.output.with_name(args.output.name + ".partial")
    write = functools.partial(
        transfer.export, store, audit=args.audit, store_kind=_kind(settings), bar=_progress
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
        f"({counts.left_out} expired or used up, left out); SHA-256 {counts.sha256}",
        file=sys.stderr,
    )
    return 0


# Conflicts named one per line, up to this many; the summary gives their number.
_CONFLICTS_SHOWN = 20


def import_command(args: argparse.Namespace) -> int:
    """Check a file from export whole, then add its records to the configured store."""
    from vault import transfer

    try:
        settings = _transfer_settings()
        if not settings.mongo_uri:
            _check_data_dir_creatable(settings)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.input is None and sys.stdin.isatty():
        return _fail(
            "import: standard input is a terminal: give --input FILE, or pipe an export into it"
        )
    name = "standard input" if args.input is None else str(args.input)
    try:
        source = sys.stdin.buffer if args.input is None else args.input.open("rb")
    except OSError as exc:
        return _fail(f"import: cannot read {name}: {exc.strerror}")
    conflicts = 0

    def conflict(line: int) -> None:
        nonlocal conflicts
        conflicts += 1
        if conflicts <= _CONFLICTS_SHOWN:
            print(
                f"secret-manager: import: conflict at line {line} of {name}: the store holds "
                "a different secret under that record's id; left it untouched",
                file=sys.stderr,
            )

    started = time.perf_counter()
    try:
        counts = transfer.import_(
            functools.partial(transfer.open_bulk_store, settings, create=True),
            source,
            bar=_progress,
            conflict=conflict,
        )
    except transfer.Refused as exc:
        return _fail(f"import: refused {name}: {exc}; nothing was written")
    except transfer.failures() as exc:
        print(
            f"secret-manager: import from {name} stopped: {exc}; the records written so far "
            "stay, and importing the file again carries on where this stopped",
            file=sys.stderr,
        )
        return 1
    finally:
        source.close()
    print(
        f"secret-manager: imported {name} into {counts.store} in "
        f"{transfer.elapsed_since(started)}: secrets {counts.new} new, {counts.present} "
        f"already there, {counts.fewer_reads} with fewer reads left, {counts.left_out} expired "
        f"since the export, {counts.conflicts} conflicts; audit records {counts.audit_new} new, "
        f"{counts.audit - counts.audit_new} already there",
        file=sys.stderr,
    )
    return 1 if counts.conflicts else 0


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _kind(settings: Settings) -> str:
    return "mongodb" if settings.mongo_uri else "sqlite"


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


def _post(url: str, path: str, payload: dict[str, str | int]) -> int:
    if not url.startswith(("http://", "https://")):
        return _fail(f"the URL (--url or SECRET_MANAGER_URL) must start with http://, got {url!r}")
    try:
        token = client_token()
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
            url.rstrip("/") + path,
            data=json.dumps(payload).encode("utf-8"),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                **({"Authorization": f"Bearer {token}"} if token else {}),
            },
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            print(response.read().decode("utf-8"))
            return 0
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")
        try:
            detail = json.loads(body)["detail"]
        except (ValueError, KeyError, TypeError):
            detail = body.strip() or exc.reason
        print(f"secret-manager: HTTP {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        # ValueError and HTTPException: a malformed URL (bad port, broken IPv6 literal).
        reason = getattr(exc, "reason", exc)
        print(f"secret-manager: cannot reach {url}: {reason}", file=sys.stderr)
        return 1


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
        type=_positive,
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
        "--batch-size", type=_positive, default=500, help="records per batch (500)"
    )
    rewrap_cmd.add_argument(
        "--max-batches",
        type=_positive,
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


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


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
        return _post(args.url, "/vault/secret/delete", {"secret_id": args.secret_id})
    return _post(args.url, "/vault/secret/fetch", {"secret_id": args.secret_id})


def create(args: argparse.Namespace) -> int:
    """Store a secret; --ttl and --max-reads are checked before stdin is read or a request sent."""
    payload: dict[str, str | int] = {}
    try:
        if args.ttl is not None:
            payload["ttl_seconds"] = parse_duration(args.ttl)
        if args.max_reads is not None:
            payload["max_reads"] = parse_max_reads(args.max_reads)
    except ValueError as exc:
        return _fail(str(exc))
    text = sys.stdin.read() if args.secret == "-" else args.secret  # noqa: S105
    # `base64` wraps its output every 76 columns; whitespace is never part of the secret.
    return _post(args.url, "/vault/secret/create", {"secret": "".join(text.split()), **payload})
