"""Commands run by an operator beside the service: ``genkey``, ``audit-hash`` and ``rewrap``."""

from __future__ import annotations

import argparse
import functools
import sys

from vault.app import audit_hmac_key, audit_hmac_keys, build_keyring
from vault.backend import backend_for
from vault.cli.common import fail, guard_keys, positive
from vault.crypto import generate_key, secret_id_hmac
from vault.errors import ConfigError, InvalidValue
from vault.settings import Settings
from vault.validation import normalize_secret_id


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``genkey``, ``audit-hash`` and ``rewrap``, and their options."""
    genkey_cmd = commands.add_parser(
        "genkey", help="print a new random master key (base64 of 32 bytes)"
    )
    genkey_cmd.set_defaults(run=genkey)

    hash_cmd = commands.add_parser(
        "audit-hash", help="print how a secret id appears in the audit log (its HMAC)"
    )
    hash_cmd.add_argument("secret_id", help="the secret id to look for")
    hash_cmd.add_argument(
        "--dev", action="store_true", help="use DATA_DIR/master.key, as `serve --dev` does"
    )
    hash_cmd.set_defaults(run=audit_hash)

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
    rewrap_cmd.set_defaults(run=rewrap)


def genkey(args: argparse.Namespace) -> int:
    """Print a new random master key."""
    print(generate_key())
    return 0


def audit_hash(args: argparse.Namespace) -> int:
    """The HMACs under which the audit log names a secret id: the active key's, then those of
    the previous master keys (records written before a rotation), one per line."""
    try:
        secret_id = normalize_secret_id(args.secret_id)
    except InvalidValue as exc:
        return fail(str(exc))
    try:
        settings = Settings.from_env()
        if settings.master_key is None and settings.audit_hmac_key is None and args.dev:
            settings = Settings.from_env(dev_key_file=settings.dev_key_path)
        keys = audit_hmac_keys(settings)
    except ConfigError as exc:
        return fail(str(exc))
    for key in keys:
        print(secret_id_hmac(key, secret_id))
    return 0


def rewrap(args: argparse.Namespace) -> int:
    """Re-encrypt under the active key every record a previous key sealed (key rotation)."""
    from vault.rewrap import EXIT_REMAINING, command

    try:
        settings = Settings.from_env()
        if settings.master_key is None and args.dev:
            settings = Settings.from_env(dev_key_file=settings.dev_key_path)
        keyring = build_keyring(settings)
        hash_key = audit_hmac_key(settings)
        backend = backend_for(settings)
        backend.check()
        if not backend.exists():
            # Opening it would create an empty store and report nothing to do.
            raise ConfigError(
                f"DATA_DIR={str(settings.data_dir)!r} holds no vault.db: run rewrap with "
                "the server's DATA_DIR (or its MONGO_URI)"
            )
        if not args.dry_run:
            # A dry run goes on: it writes nothing, and lists each such record by the
            # HMAC the audit log names it by, with the key id that sealed it.
            guard_keys(settings, keyring.key_ids, on_unchecked=_rewrap_unchecked)
    except ConfigError as exc:
        return fail(str(exc))
    except _NotAsked as exc:
        print(
            f"secret-manager: rewrap did not start: the store could not be asked ({exc}); "
            "nothing was written: run rewrap again once it answers",
            file=sys.stderr,
        )
        return EXIT_REMAINING
    return command(
        backend.open(),
        keyring,
        store_label=backend.label,
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
