"""``create``, ``fetch`` and ``delete``: a small HTTP client of a running service."""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import urllib.error
import urllib.request

from vault.cli.common import fail
from vault.errors import ConfigError
from vault.settings import client_token, client_url


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``create``, ``fetch`` and ``delete``, and their options."""
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
    create_cmd.set_defaults(run=create)

    fetch_cmd = commands.add_parser("fetch", help="print the secret stored under an id")
    fetch_cmd.add_argument("secret_id", help="the id printed by create")
    fetch_cmd.add_argument("--url", default=default_url, help=f"service URL ({default_url})")
    fetch_cmd.set_defaults(run=fetch)

    delete_cmd = commands.add_parser("delete", help="delete the secret stored under an id")
    delete_cmd.add_argument("secret_id", help="the id printed by create")
    delete_cmd.add_argument("--url", default=default_url, help=f"service URL ({default_url})")
    delete_cmd.set_defaults(run=delete)


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


def post(url: str, path: str, payload: dict[str, str | int]) -> int:
    if not url.startswith(("http://", "https://")):
        return fail(f"the URL (--url or SECRET_MANAGER_URL) must start with http://, got {url!r}")
    try:
        token = client_token()
    except ConfigError as exc:
        return fail(str(exc))
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


def create(args: argparse.Namespace) -> int:
    """Store a secret; --ttl and --max-reads are checked before stdin is read or a request sent."""
    payload: dict[str, str | int] = {}
    try:
        if args.ttl is not None:
            payload["ttl_seconds"] = parse_duration(args.ttl)
        if args.max_reads is not None:
            payload["max_reads"] = parse_max_reads(args.max_reads)
    except ValueError as exc:
        return fail(str(exc))
    text = sys.stdin.read() if args.secret == "-" else args.secret  # noqa: S105
    # `base64` wraps its output every 76 columns; whitespace is never part of the secret.
    return post(args.url, "/vault/secret/create", {"secret": "".join(text.split()), **payload})


def fetch(args: argparse.Namespace) -> int:
    """Print the secret stored under an id."""
    # The id goes in the body, never in the URL: it is a bearer capability.
    return post(args.url, "/vault/secret/fetch", {"secret_id": args.secret_id})


def delete(args: argparse.Namespace) -> int:
    """Delete the secret stored under an id."""
    return post(args.url, "/vault/secret/delete", {"secret_id": args.secret_id})
