"""``secret-manager serve``: check everything a user can get wrong, then run Hypercorn.

Start-up problems a user can fix (a missing key, a malformed variable, a busy port, a
Hypercorn release other than the one vault/hypercorn_fixes.py is written for) end with one
line naming the cause and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import shutil
import signal
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from observability.metrics import prepare_multiprocess_dir
from vault.app import build_keyring, worker_app
from vault.backend import backend_for
from vault.cli.common import fail, guard_keys, positive, unknown_key_counts
from vault.crypto import generate_key, key_id
from vault.errors import ConfigError
from vault.keyguard import dev_refusal, refused
from vault.settings import Settings

if TYPE_CHECKING:
    from hypercorn.config import Config

log = logging.getLogger("secret_manager.cli")

H2_MAX_CONCURRENT_STREAMS = 100  # Hypercorn's default, set here on purpose


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``serve`` and its options."""
    command = commands.add_parser("serve", help="run the HTTP service on Hypercorn")
    command.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    command.add_argument("--port", type=int, default=8000, help="port to bind (8000)")
    command.add_argument(
        "--workers",
        type=positive,
        default=1,
        help="worker processes (1; on Swarm, scale replicas instead)",
    )
    command.add_argument(
        "--dev",
        action="store_true",
        help="with no key configured, keep a generated key in DATA_DIR/master.key (laptops only)",
    )
    command.set_defaults(run=serve)


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


def serve(args: argparse.Namespace) -> int:
    """Validate everything, then hand over to Hypercorn; SIGTERM/SIGINT drain it gracefully,
    SIGHUP re-reads API_KEYS_FILE."""
    # Not the default action (the end of the process) while starting: each worker re-reads
    # the key file when it installs its SIGHUP handler, so a signal ignored now is not lost.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        settings = _preflight(args)
    except ConfigError as exc:
        return fail(str(exc))

    from vault.workers import serve_one, serve_workers

    created_metrics_dir = _prepare_metrics_dir(settings, args.workers)
    if created_metrics_dir is not None:
        # The workers' /metrics sums what every worker writes there.
        settings = dataclasses.replace(settings, prometheus_multiproc_dir=created_metrics_dir)
    config = _hypercorn_config(settings, args)
    # The settings travel to each worker inside the app factory (pickled into a spawned
    # worker's start-up arguments): validated once here, never re-read from the environment.
    make_app = functools.partial(worker_app, settings)
    try:
        # More than one worker: our supervisor, which drains them all (vault/workers.py).
        if args.workers == 1:
            return serve_one(make_app, config)
        return serve_workers(make_app, config, args.workers)
    except OSError as exc:
        return fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    finally:
        if created_metrics_dir is not None:
            shutil.rmtree(created_metrics_dir, ignore_errors=True)


def _preflight(args: argparse.Namespace) -> Settings:
    """Everything a user can get wrong, checked before binding: ConfigError naming it."""
    from observability.logging import configure_logging
    from vault import hypercorn_fixes

    # First: the fixes every worker applies are written for one Hypercorn release.
    hypercorn_fixes.check()
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    if settings.master_key is None and args.dev:
        if not settings.dev_key_path.exists():
            # Before a new key is written: a lost key file must not be replaced silently.
            _guard_fresh_dev_key(settings)
        settings = Settings.from_env(dev_key_file=_dev_key(settings.dev_key_path))
    keyring = build_keyring(settings)
    backend = backend_for(settings)
    backend.check()
    backend.check_writable(create=True)
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        _check_tls(settings.tls_certfile, settings.tls_keyfile)
    guard_keys(settings, keyring.key_ids, on_unchecked=_serve_unchecked)
    return settings


def _hypercorn_config(settings: Settings, args: argparse.Namespace) -> Config:
    """Hypercorn's configuration: the address, the workers, and the deliberate timeouts."""
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"]
    # One worker runs in this process; more are spawned processes, each building the app.
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
    # HTTP/2 (over TLS only): the streams a client may have open at once, and, through
    # vault/hypercorn_fixes.py, the requests one connection may have running at once, the
    # streams it reset included.
    config.h2_max_concurrent_streams = H2_MAX_CONCURRENT_STREAMS
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        config.certfile = str(settings.tls_certfile)
        config.keyfile = str(settings.tls_keyfile)
        # Hypercorn's default is 60 s: a client that opens a connection and never completes
        # its handshake would hold it twelve times as long as an idle plain one.
        config.ssl_handshake_timeout = settings.read_timeout_seconds
    return config


def _serve_unchecked(reason: str) -> None:
    log.warning(
        "key check not run: the store could not be asked (%s); starting anyway. Records no "
        "configured key can open are reported by /readyz (records_unreadable) and the "
        "vault_records_unreadable metric once the store answers",
        reason,
    )


def _guard_fresh_dev_key(settings: Settings) -> None:
    """``serve --dev`` with no DATA_DIR/master.key: refuse to generate a new key when the
    store holds live records that neither it nor MASTER_KEY_PREVIOUS could open (the key
    file was deleted, or DATA_DIR points at another server's data)."""
    backend = backend_for(settings)
    backend.check()
    previous = [key_id(key) for key in settings.previous_keys]
    try:
        counts = unknown_key_counts(settings, previous)
    except Exception as exc:  # a new key is written all the same; the app counts later
        _serve_unchecked(type(exc).__name__)
        return
    blocking = refused(counts, settings.retired_key_ids)
    if blocking:
        raise ConfigError(dev_refusal(str(settings.dev_key_path), backend.label, blocking))


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
    if created is not None:
        # The one variable written: prometheus_client itself reads it, once, when a process
        # first imports it, which a spawned worker does while it unpickles its arguments,
        # before any code of ours runs there. A directory given by the operator is in the
        # environment the workers inherit already.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return created
