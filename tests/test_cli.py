"""The ``secret-manager`` command line, run as a real subprocess against real servers."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import clean_env, free_port
from vault.cli.client import parse_duration, parse_max_reads
from vault.crypto import generate_key
from vault.hypercorn_fixes import HYPERCORN_VERSION

pytestmark = pytest.mark.slow


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vault", *args],
        env=clean_env() if env is None else env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _json_line(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


@pytest.fixture
def server(start_server: Callable[..., Any], tmp_path: Path, master_key: str) -> Any:
    return start_server({"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data")})


# --- genkey and the console script -------------------------------------------------------


def test_genkey_prints_base64_of_32_random_bytes() -> None:
    first, second = cli("genkey"), cli("genkey")
    for result in (first, second):
        assert result.returncode == 0, result.stderr
        key = result.stdout.strip()
        assert len(base64.b64decode(key, validate=True)) == 32
        assert base64.b64encode(base64.b64decode(key)).decode() == key  # standard alphabet
    assert first.stdout.strip() != second.stdout.strip()


def test_console_script_is_installed_and_shows_help() -> None:
    script = shutil.which("secret-manager")
    assert script is not None, "the secret-manager console script is not on PATH"
    result = subprocess.run(
        [script, "--help"], env=clean_env(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    for command in ("serve", "genkey", "create", "fetch"):
        assert command in result.stdout


# --- create / fetch against a running server ---------------------------------------------


def test_create_and_fetch_round_trip(server: Any) -> None:
    secret = base64.b64encode(os.urandom(48)).decode()

    created = _json_line(cli("create", "--url", server.url, secret))
    assert set(created) == {"secret_id"}
    secret_id = created["secret_id"]
    uuid.UUID(secret_id)
    assert _json_line(cli("fetch", "--url", server.url, secret_id)) == {"secret": secret}

    # The URL from SECRET_MANAGER_URL instead of --url.
    env = clean_env(SECRET_MANAGER_URL=server.url)
    assert _json_line(cli("fetch", secret_id, env=env)) == {"secret": secret}
    other = base64.b64encode(b"via the environment").decode()
    other_id = _json_line(cli("create", other, env=env))["secret_id"]
    assert _json_line(cli("fetch", other_id, env=env)) == {"secret": other}

    # '-' reads the secret from stdin (a trailing newline, as `echo` adds, is fine).
    piped = base64.b64encode(b"from stdin \x00\xff").decode()
    piped_id = _json_line(cli("create", "--url", server.url, "-", stdin=piped + "\n"))["secret_id"]
    assert _json_line(cli("fetch", "--url", server.url, piped_id)) == {"secret": piped}
    assert len({secret_id, other_id, piped_id}) == 3


def test_create_takes_base64_wrapped_the_way_the_base64_tool_wraps_it(server: Any) -> None:
    # GNU base64 breaks its output every 76 columns: any secret over 57 bytes.
    plaintext = os.urandom(200)
    encoded = base64.b64encode(plaintext).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + "\n"
    assert wrapped.count("\n") == 4

    piped_id = _json_line(cli("create", "--url", server.url, "-", stdin=wrapped))["secret_id"]
    argument_id = _json_line(cli("create", "--url", server.url, wrapped))["secret_id"]
    for secret_id in (piped_id, argument_id):
        assert _json_line(cli("fetch", "--url", server.url, secret_id)) == {"secret": encoded}


def test_a_token_a_header_cannot_carry_is_refused_without_quoting_it(server: Any) -> None:
    token = "t0ken-" + "x" * 40
    # A CRLF env file leaves a carriage return behind: dropped like other surrounding space.
    env = clean_env(SECRET_MANAGER_URL=server.url, SECRET_MANAGER_TOKEN=token + "\r")
    created = cli("create", base64.b64encode(b"crlf").decode(), env=env)
    assert _json_line(created).keys() == {"secret_id"}

    broken = clean_env(SECRET_MANAGER_URL=server.url, SECRET_MANAGER_TOKEN=token + "\x7f!")
    for args in (("create", "aGk="), ("fetch", str(uuid.uuid4())), ("delete", str(uuid.uuid4()))):
        result = cli(*args, env=broken)
        assert result.returncode != 0
        assert "SECRET_MANAGER_TOKEN" in result.stderr
        assert token not in result.stderr
        assert "x" * 20 not in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


def test_http_errors_exit_nonzero_with_the_servers_detail(server: Any) -> None:
    missing = cli("fetch", "--url", server.url, str(uuid.uuid4()))
    assert missing.returncode != 0
    assert missing.stdout == ""
    assert "HTTP 404" in missing.stderr
    assert "no secret has this secret_id" in missing.stderr
    assert "Traceback" not in missing.stderr

    invalid = cli("create", "--url", server.url, "not base64!")
    assert invalid.returncode != 0
    assert invalid.stdout == ""
    assert "HTTP 400" in invalid.stderr
    assert "base64" in invalid.stderr
    assert "Traceback" not in invalid.stderr


def test_unreachable_server_is_one_clear_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (
        ("fetch", "--url", url, str(uuid.uuid4())),
        ("create", "--url", url, "aGk="),
        ("delete", "--url", url, str(uuid.uuid4())),
    ):
        result = cli(*args)
        assert result.returncode != 0
        assert "cannot reach" in result.stderr
        assert url in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


# --- lifecycle: --ttl, --max-reads and delete --------------------------------------------


def test_help_names_the_lifecycle_options_and_delete() -> None:
    top = cli("--help")
    assert top.returncode == 0 and "delete" in top.stdout
    create = cli("create", "--help")
    assert create.returncode == 0
    assert "--ttl DURATION" in create.stdout and "--max-reads N" in create.stdout
    assert "90 or 90s, 15m, 2h, 7d" in " ".join(create.stdout.split())  # wrapped to the width


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("1", 1),
        ("1s", 1),
        ("15m", 900),
        ("2h", 7200),
        ("7d", 604800),
        ("0090", 90),
        ("3650d", 315360000),
    ],
)
def test_a_duration_is_a_whole_number_of_one_unit(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "s",
        "m",
        "1.5h",
        "1,5h",
        "1h30m",
        "2H",
        "2 h",
        " 2h",
        "2h ",
        "+2h",
        "2w",
        "2hours",
        "1e3",
        "0x10",
        "\u0661\u0662h",
        "٩٠",
        "inf",
        "90ss",
    ],
)
def test_anything_but_a_number_and_one_unit_is_not_a_duration(text: str) -> None:
    with pytest.raises(
        ValueError,
        match=r"^--ttl must be a whole number of seconds.*like 90, 90s, 15m, 2h or 7d; got ",
    ):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0", "0s", "00", "0m", "0d", "-1", "-5m", "-2h"])
def test_a_duration_is_at_least_one_second(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--ttl must be at least 1 second, got "):
        parse_duration(text)


def test_a_duration_past_what_python_converts_is_refused_not_a_crash() -> None:
    with pytest.raises(ValueError, match=r"^--ttl is far too long"):
        parse_duration("9" * 5000 + "d")


def test_max_reads_is_a_whole_number_from_one() -> None:
    assert parse_max_reads("1") == 1
    assert parse_max_reads("1000000") == 1000000
    for text in ("0", "00", "-1", "1.0", "1e3", "", "one", " 1", "+1", "٣"):
        with pytest.raises(ValueError, match=r"^--max-reads must be a whole number of reads"):
            parse_max_reads(text)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--ttl", "0"), "secret-manager: --ttl must be at least 1 second, got '0'"),
        (("--ttl=-5m",), "secret-manager: --ttl must be at least 1 second, got '-5m'"),
        (("--ttl", "-5"), "secret-manager: --ttl must be at least 1 second, got '-5'"),
        (
            ("--ttl", "1.5h"),
            "secret-manager: --ttl must be a whole number of seconds, or of "
            "minutes, hours or days with their unit, like 90, 90s, 15m, 2h or 7d; got '1.5h'",
        ),
        (
            ("--ttl", "-5m"),
            "secret-manager create: argument --ttl: expected one argument "
            "(see secret-manager create --help)",
        ),
        (
            ("--max-reads", "0"),
            "secret-manager: --max-reads must be a whole number of reads, at least 1; got '0'",
        ),
        (
            ("--ttl", "2h", "--max-reads", "-1"),
            "secret-manager: --max-reads must be a whole number of reads, at least 1; got '-1'",
        ),
    ],
)
def test_a_bad_ttl_or_max_reads_is_one_line_and_exit_2_before_any_request(
    args: tuple[str, ...], expected: str
) -> None:
    with socket.socket() as listener:  # a server that would see any connection attempt
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result = cli("create", "--url", url, *args, "-", stdin="aGk=")
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [expected]


def _utc(text: str) -> dt.datetime:
    """An RFC 3339 UTC time in whole seconds, as the API writes it: 2026-12-01T15:04:05Z."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text), text
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def test_create_with_ttl_and_max_reads_then_one_fetch_then_404(server: Any) -> None:
    secret = base64.b64encode(b"deploy credential").decode()
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    created = _json_line(
        cli("create", "--url", server.url, "--ttl", "2h", "--max-reads", "1", secret)
    )
    after = dt.datetime.now(dt.UTC)
    assert set(created) == {"secret_id", "expires_at", "reads_left"}
    assert created["reads_left"] == 1
    expires_at = _utc(created["expires_at"])
    # It lives at least the 2 hours asked for, and not much longer.
    assert before + dt.timedelta(hours=2) <= expires_at <= after + dt.timedelta(hours=2, seconds=1)

    fetched = _json_line(cli("fetch", "--url", server.url, created["secret_id"]))
    assert fetched == {"secret": secret, "reads_left": 0, "expires_at": created["expires_at"]}
    gone = cli("fetch", "--url", server.url, created["secret_id"])
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr.splitlines() == [
        "secret-manager: HTTP 404: no secret has this secret_id; check the id you were given"
    ]


def test_each_duration_unit_reaches_the_server_as_seconds(server: Any) -> None:
    for ttl, seconds in (("90", 90), ("90s", 90), ("15m", 900), ("7d", 604800)):
        before = dt.datetime.now(dt.UTC).replace(microsecond=0)
        created = _json_line(cli("create", "--url", server.url, "--ttl", ttl, "aGk="))
        after = dt.datetime.now(dt.UTC)
        assert set(created) == {"secret_id", "expires_at"}, ttl
        expires_at = _utc(created["expires_at"])
        span = dt.timedelta(seconds=seconds)
        assert before + span <= expires_at <= after + span + dt.timedelta(seconds=1), ttl
    limited = _json_line(cli("create", "--url", server.url, "--max-reads", "3", "aGk="))
    assert set(limited) == {"secret_id", "reads_left"} and limited["reads_left"] == 3


def test_the_servers_own_limits_come_back_as_its_detail(server: Any) -> None:
    too_many = cli("create", "--url", server.url, "--max-reads", "1000001", "aGk=")
    assert too_many.returncode == 1 and too_many.stdout == ""
    assert "HTTP 400" in too_many.stderr and "max_reads" in too_many.stderr
    too_long = cli("create", "--url", server.url, "--ttl", "3651d", "aGk=")
    assert too_long.returncode == 1 and too_long.stdout == ""
    assert "HTTP 400" in too_long.stderr and "ttl_seconds" in too_long.stderr


def test_delete_answers_deleted_then_404(server: Any) -> None:
    secret = base64.b64encode(b"leaked").decode()
    secret_id = _json_line(cli("create", "--url", server.url, secret))["secret_id"]
    assert _json_line(cli("delete", "--url", server.url, secret_id)) == {
        "secret_id": secret_id,
        "deleted": True,
    }
    not_found = [
        "secret-manager: HTTP 404: no secret has this secret_id; check the id you were given"
    ]
    for command in ("fetch", "delete"):
        result = cli(command, "--url", server.url, secret_id)
        assert result.returncode == 1 and result.stdout == "", command
        assert result.stderr.splitlines() == not_found, command

    # SECRET_MANAGER_URL instead of --url; a malformed id is the server's 400.
    env = clean_env(SECRET_MANAGER_URL=server.url)
    other = _json_line(cli("create", "aGk=", env=env))["secret_id"]
    assert _json_line(cli("delete", other.upper(), env=env)) == {
        "secret_id": other,
        "deleted": True,
    }
    malformed = cli("delete", "not-a-uuid", env=env)
    assert malformed.returncode == 1 and malformed.stdout == ""
    assert "HTTP 400" in malformed.stderr and "secret_id must be a UUID" in malformed.stderr


def test_delete_sends_the_api_key(
    start_server: Callable[..., Any], tmp_path: Path, master_key: str
) -> None:
    token = "d" * 40
    guarded = start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data"), "API_KEYS": f"ops:{token}"}
    )
    env = clean_env(SECRET_MANAGER_URL=guarded.url, SECRET_MANAGER_TOKEN=token)
    secret_id = _json_line(cli("create", "aGk=", env=env))["secret_id"]
    refused = cli("delete", secret_id, env=clean_env(SECRET_MANAGER_URL=guarded.url))
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    assert _json_line(cli("delete", secret_id, env=env)) == {
        "secret_id": secret_id,
        "deleted": True,
    }


# --- receipts and readers ----------------------------------------------------------------


def test_create_with_a_receipt_and_a_label_then_status(server: Any) -> None:
    created = _json_line(
        cli(
            "create", "--url", server.url, "--max-reads", "1", "--receipt",
            "--label", "db password for alice", "aGk=",
        )
    )  # fmt: skip
    assert set(created) == {"secret_id", "reads_left", "receipt_id"}
    receipt_id = created["receipt_id"]
    active = _json_line(cli("status", "--url", server.url, receipt_id))
    assert (active["state"], active["label"], active["reads"]) == (
        "active",
        "db password for alice",
        0,
    )
    assert _json_line(cli("fetch", "--url", server.url, created["secret_id"]))["secret"] == "aGk="
    env = clean_env(SECRET_MANAGER_URL=server.url)
    used = _json_line(cli("status", receipt_id, env=env))
    assert (used["state"], used["reads"], used["reads_left"]) == ("used_up", 1, 0)
    assert used["ended_at"] == used["last_read_at"] is not None

    unknown = cli("status", "--url", server.url, str(uuid.uuid4()))
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.splitlines() == [
        "secret-manager: HTTP 404: no receipt has this receipt_id; check the id the create answered"
    ]
    # Without --receipt, no receipt_id; a label alone is accepted.
    plain = _json_line(cli("create", "--url", server.url, "--label", "note", "aGk="))
    assert set(plain) == {"secret_id"}


def test_help_names_receipts_readers_and_status() -> None:
    assert "status" in cli("--help").stdout
    create = " ".join(cli("create", "--help").stdout.split())
    for option in ("--receipt", "--label TEXT", "--readers NAMES"):
        assert option in create
    status = cli("status", "--help")
    assert status.returncode == 0 and "receipt_id" in status.stdout


def test_create_with_readers_lets_only_them_fetch(
    start_server: Callable[..., Any], tmp_path: Path, master_key: str
) -> None:
    tokens = {"acme/ci": "c" * 40, "acme/billing": "b" * 40, "acme/web": "w" * 40}
    keys = f"acme/ci:{tokens['acme/ci']},acme/billing:{tokens['acme/billing']}:fetch+delete,"
    keys += f"acme/web:{tokens['acme/web']}"
    guarded = start_server(
        {"MASTER_KEY": master_key, "DATA_DIR": str(tmp_path / "data"), "API_KEYS": keys}
    )

    def env(key: str) -> dict[str, str]:
        return clean_env(SECRET_MANAGER_URL=guarded.url, SECRET_MANAGER_TOKEN=tokens[key])

    created = _json_line(cli("create", "--readers", "billing, web", "aGk=", env=env("acme/ci")))
    assert created["readers"] == ["billing", "web"]
    fetched = _json_line(cli("fetch", created["secret_id"], env=env("acme/billing")))
    assert fetched == {"secret": "aGk=", "readers": ["billing", "web"]}
    creator = cli("fetch", created["secret_id"], env=env("acme/ci"))  # not a reader
    assert creator.returncode == 1 and "HTTP 404" in creator.stderr

    unknown = cli("create", "--readers", "billing,nobody", "aGk=", env=env("acme/ci"))
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert "HTTP 400" in unknown.stderr and "nobody" in unknown.stderr
    forbidden = cli("create", "aGk=", env=env("acme/billing"))
    assert forbidden.returncode == 1 and "HTTP 403" in forbidden.stderr


# --- passphrases -------------------------------------------------------------------------

LOCKED = 'this secret is protected by a passphrase: send it as "passphrase" in the fetch body'
PASSPHRASE = "correct horse  battery staple "  # its spaces are part of it


def test_create_and_fetch_with_a_passphrase_file(
    start_server: Callable[..., Any], tmp_path: Path, master_key: str
) -> None:
    # Every request's audit record and every debug line in the log, to search it there.
    server = start_server(
        {
            "MASTER_KEY": master_key,
            "DATA_DIR": str(tmp_path / "data"),
            "AUDIT_STDOUT": "true",
            "LOG_LEVEL": "DEBUG",
        }
    )
    right = tmp_path / "passphrase"
    right.write_text(PASSPHRASE + "\n")  # as `echo` writes it
    secret = base64.b64encode(b"behind a passphrase").decode()
    runs = []

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        runs.append(cli(*args, stdin=stdin))
        return runs[-1]

    created = _json_line(
        run("create", "--url", server.url, "--receipt", "--passphrase-file", str(right), secret)
    )
    assert set(created) == {"secret_id", "receipt_id"}
    secret_id, receipt_id = created["secret_id"], created["receipt_id"]

    locked = run("fetch", "--url", server.url, secret_id)
    assert (locked.returncode, locked.stdout) == (1, "")
    assert locked.stderr.splitlines() == [f"secret-manager: HTTP 403: {LOCKED}"]
    # Only the one trailing newline is dropped: without its trailing space, or with a second
    # newline, it is another passphrase, and each wrong one is counted once.
    for n, content in enumerate((PASSPHRASE.rstrip() + "\n", PASSPHRASE + "\n\n")):
        wrong_file = tmp_path / f"wrong{n}"
        wrong_file.write_text(content)
        wrong = run("fetch", "--url", server.url, "--passphrase-file", str(wrong_file), secret_id)
        assert (wrong.returncode, wrong.stdout) == (1, "")
        assert wrong.stderr.splitlines() == [
            f"secret-manager: HTTP 403: the passphrase is wrong; after {4 - n} more wrong tries "
            "the secret is deleted"
        ]
    status = _json_line(run("status", "--url", server.url, receipt_id))
    assert (status["passphrase_failures"], status["reads"], status["state"]) == (2, 0, "active")

    fetched = run("fetch", "--url", server.url, "--passphrase-file", str(right), secret_id)
    assert _json_line(fetched) == {"secret": secret}
    # '-' reads it from standard input; a CRLF line ending is one newline too.
    piped = run(
        "fetch", "--url", server.url, "--passphrase-file", "-", secret_id,
        stdin=PASSPHRASE + "\r\n",
    )  # fmt: skip
    assert _json_line(piped) == {"secret": secret}
    used = _json_line(run("status", "--url", server.url, receipt_id))
    assert (used["passphrase_failures"], used["reads"]) == (2, 2)
    # A secret without a passphrase has no such field.
    plain = _json_line(run("create", "--url", server.url, "--receipt", secret))
    assert "passphrase_failures" not in _json_line(
        run("status", "--url", server.url, plain["receipt_id"])
    )

    # The passphrase is in no output of the command, nor in the server's log.
    logs = [path.read_text(errors="replace") for path in tmp_path.glob("serve-*.log")]
    assert any(log.count('"denied"') >= 3 for log in logs)  # the refusals' audit records
    for text in [r.stdout + r.stderr for r in runs] + logs:
        assert "battery staple" not in text


@pytest.mark.parametrize("command", ["create", "fetch"])
def test_a_passphrase_file_that_cannot_be_used_is_one_line_and_exit_2(
    tmp_path: Path, command: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would say so
    operand = "aGk=" if command == "create" else str(uuid.uuid4())
    empty, blank, binary = tmp_path / "empty", tmp_path / "blank", tmp_path / "binary"
    empty.write_bytes(b"")
    blank.write_bytes(b"\n")
    binary.write_bytes(b"\xffbattery staple")
    cases = {
        tmp_path / "missing": "cannot read {}: No such file or directory",
        tmp_path: "cannot read {}: Is a directory",
        empty: "{} is empty; write the passphrase in it",
        blank: "{} is empty; write the passphrase in it",
        binary: "{} is not UTF-8 text",
    }
    for path, message in cases.items():
        result = cli(command, "--url", url, "--passphrase-file", str(path), operand)
        assert (result.returncode, result.stdout) == (2, ""), path
        assert result.stderr.splitlines() == [
            f"secret-manager: --passphrase-file: {message.format(path)}"
        ]
        assert "battery staple" not in result.stderr
    from_stdin = cli(command, "--url", url, "--passphrase-file", "-", operand, stdin="")
    assert from_stdin.returncode == 2
    assert from_stdin.stderr.splitlines() == [
        "secret-manager: --passphrase-file: standard input is empty; write the passphrase in it"
    ]


@pytest.mark.parametrize("command", ["create", "fetch"])
def test_a_passphrase_is_never_taken_as_an_argument(command: str) -> None:
    operand = "aGk=" if command == "create" else str(uuid.uuid4())
    for args in (["--passphrase", "battery staple"], ["--passphrase=battery staple"]):
        result = cli(command, "--url", "http://127.0.0.1:9", *args, operand)
        assert (result.returncode, result.stdout) == (2, "")
        assert "--passphrase-file FILE" in result.stderr and "history" in result.stderr
        assert "battery staple" not in result.stderr
    usage = " ".join(cli(command, "--help").stdout.split())
    assert "--passphrase-file FILE" in usage and "--passphrase " not in usage


def test_the_secret_and_the_passphrase_cannot_both_come_from_stdin() -> None:
    result = cli(
        "create", "--url", "http://127.0.0.1:9", "--passphrase-file", "-", "-", stdin="aGk=\n"
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "secret-manager: the secret and --passphrase-file cannot both be read from standard input"
    ]


# --- serve refuses to start on configuration a user can fix -------------------------------


def _refusal(tmp_path: Path, *extra: str, **env: str) -> str:
    """Run ``serve`` expecting a refusal; return its single stderr line."""
    result = cli(
        "serve",
        "--port",
        str(free_port()),
        *extra,
        env=clean_env(**{"DATA_DIR": str(tmp_path / "data"), **env}),
        timeout=20,
    )
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_refuses_without_a_key(tmp_path: Path) -> None:
    line = _refusal(tmp_path)
    assert "MASTER_KEY" in line
    assert not (tmp_path / "data" / "master.key").exists()


def test_refuses_a_malformed_key_without_echoing_it(tmp_path: Path) -> None:
    line = _refusal(tmp_path, MASTER_KEY="tooshort")
    assert "MASTER_KEY" in line
    assert "tooshort" not in line


def test_refuses_a_missing_key_file(tmp_path: Path) -> None:
    line = _refusal(tmp_path, MASTER_KEY_FILE=str(tmp_path / "no-such-key"))
    assert "MASTER_KEY_FILE" in line


def test_refuses_key_and_key_file_together(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(generate_key())
    key = generate_key()
    line = _refusal(tmp_path, MASTER_KEY=key, MASTER_KEY_FILE=str(key_file))
    assert re.search(r"\bMASTER_KEY\b", line), line  # the variable itself, not only _FILE
    assert "MASTER_KEY_FILE" in line
    assert key not in line


def test_refuses_a_malformed_number(tmp_path: Path) -> None:
    line = _refusal(tmp_path, MASTER_KEY=generate_key(), MAX_SECRET_BYTES="abc")
    assert "MAX_SECRET_BYTES" in line


def test_refuses_a_malformed_previous_key(tmp_path: Path) -> None:
    good = generate_key()
    line = _refusal(
        tmp_path, MASTER_KEY=generate_key(), MASTER_KEY_PREVIOUS=f"{good},not-a-key-at-all"
    )
    assert "MASTER_KEY_PREVIOUS" in line
    assert good not in line
    assert "not-a-key-at-all" not in line


def test_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli(
            "serve",
            "--port",
            str(port),
            env=clean_env(DATA_DIR=str(tmp_path / "data"), MASTER_KEY=generate_key()),
            timeout=20,
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0]


def test_refuses_a_hypercorn_other_than_the_one_its_fixes_are_written_for(tmp_path: Path) -> None:
    """Another release's metadata ahead of the installed one on the path, as an upgrade
    would leave it: serve stops before it binds, in one line naming both releases."""
    metadata = tmp_path / "site" / "hypercorn-0.17.3.dist-info"
    metadata.mkdir(parents=True)
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: hypercorn\nVersion: 0.17.3\n")
    line = _refusal(tmp_path, MASTER_KEY=generate_key(), PYTHONPATH=str(tmp_path / "site"))
    assert line == (
        f"secret-manager: Hypercorn 0.17.3 is installed, but vault/hypercorn_fixes.py is "
        f"written for Hypercorn {HYPERCORN_VERSION} exactly: install "
        f"hypercorn=={HYPERCORN_VERSION}"
    )


# --- accepted key spellings ---------------------------------------------------------------


def _round_trip(url: str) -> None:
    assert httpx.get(url + "/healthz", timeout=5).json() == {"status": "ok"}
    secret = base64.b64encode(os.urandom(20)).decode()
    secret_id = _json_line(cli("create", "--url", url, secret))["secret_id"]
    assert _json_line(cli("fetch", "--url", url, secret_id)) == {"secret": secret}


def test_raw_32_character_key_is_accepted(start_server: Callable[..., Any], tmp_path: Path) -> None:
    raw = "an-old-style-raw-32-char-key-XYZ"
    assert len(raw) == 32
    server = start_server({"MASTER_KEY": raw, "DATA_DIR": str(tmp_path / "data")})
    _round_trip(server.url)
    assert raw not in server.output()


def test_key_file_with_surrounding_whitespace_is_accepted(
    start_server: Callable[..., Any], tmp_path: Path, master_key: str
) -> None:
    key_file = tmp_path / "master_key"
    key_file.write_text(f"  {master_key}\n\n")
    server = start_server({"MASTER_KEY_FILE": str(key_file), "DATA_DIR": str(tmp_path / "data")})
    _round_trip(server.url)
    assert master_key not in server.output()


def test_malformed_urls_are_one_clear_message() -> None:
    for url in ("http://127.0.0.1:abc", "http://[::1", "ftp://example"):
        result = cli("fetch", "--url", url, str(uuid.uuid4()))
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_refuses_an_unusable_mongo_uri_without_echoing_its_password(tmp_path: Path) -> None:
    key = generate_key()
    line = _refusal(tmp_path, MASTER_KEY=key, MONGO_URI="postgres://db/")
    assert "MONGO_URI" in line
    # A typo in an option is refused (pymongo itself would only warn and ignore it).
    line = _refusal(tmp_path, MASTER_KEY=key, MONGO_URI="mongodb://u:hunter2@db/?wtimeout_ms=5")
    assert "MONGO_URI" in line
    assert "hunter2" not in line


def test_dev_mode_refuses_an_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _refusal(tmp_path, "--dev", DATA_DIR=str(blocker / "data"))
    assert "DATA_DIR" in line
