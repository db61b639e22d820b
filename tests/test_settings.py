"""vault/settings/: every variable read, validated, and named when malformed."""

from __future__ import annotations

import ast
import base64
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vault.client import TOKEN_VARIABLE, URL_VARIABLE
from vault.crypto import generate_key, key_id, parse_key
from vault.errors import ConfigError
from vault.settings import (
    AuditMode,
    RateLimitStorage,
    Settings,
    TracesExporter,
    all_variables,
    client_url,
)


def test_defaults_with_only_a_key() -> None:
    key = generate_key()
    settings = Settings.from_env({"MASTER_KEY": key})
    assert settings.master_key == base64.b64decode(key)
    assert settings.mongo_uri is None
    assert settings.mongo_db == "vault"
    assert settings.mongo_write_concern == "majority"
    assert settings.mongo_journal is True
    assert settings.data_dir == Path("data")
    assert settings.max_secret_bytes == 65536
    # The body cap sits a little above the base64 of the largest secret.
    assert 87384 < settings.max_body_bytes < 2 * 87384


def test_no_key_is_not_an_error_here_but_the_key_stays_out_of_repr() -> None:
    assert Settings.from_env({}).master_key is None
    key = generate_key()
    uri = "mongodb://user:pa55word@db/"
    text = repr(Settings.from_env({"MASTER_KEY": key, "MONGO_URI": uri}))
    assert key not in text
    assert "pa55word" not in text


def test_key_file_with_whitespace_and_previous_keys_file(tmp_path: Path) -> None:
    active, old1, old2 = generate_key(), generate_key(), generate_key()
    (tmp_path / "k").write_text(f"  {active}\n")
    (tmp_path / "prev").write_text(f"{old1},\n{old2}\n")
    settings = Settings.from_env(
        {"MASTER_KEY_FILE": str(tmp_path / "k"), "MASTER_KEY_PREVIOUS_FILE": str(tmp_path / "prev")}
    )
    assert settings.master_key == base64.b64decode(active)
    assert settings.previous_keys == (base64.b64decode(old1), base64.b64decode(old2))


def test_mongo_uri_file(tmp_path: Path) -> None:
    (tmp_path / "uri").write_text("mongodb://db1,db2/?replicaSet=rs0\n")
    settings = Settings.from_env({"MONGO_URI_FILE": str(tmp_path / "uri")})
    assert settings.mongo_uri == "mongodb://db1,db2/?replicaSet=rs0"


def test_rate_limit_storage_file_shares_the_mongo_uri_secret(tmp_path: Path) -> None:
    """The stack points both at one Docker secret: the URI's password is in no variable."""
    (tmp_path / "uri").write_text("mongodb://app:pa55word@db1,db2/?replicaSet=rs0\n")
    uri_file = str(tmp_path / "uri")
    env = {"MONGO_URI_FILE": uri_file, "RATE_LIMIT_STORAGE_FILE": uri_file}
    settings = Settings.from_env(env)
    assert settings.rate_limit_storage == settings.mongo_uri
    assert settings.rate_limit_storage == "mongodb://app:pa55word@db1,db2/?replicaSet=rs0"
    assert "pa55word" not in repr(settings)
    with pytest.raises(ConfigError, match="RATE_LIMIT_STORAGE and RATE_LIMIT_STORAGE_FILE"):
        Settings.from_env({**env, "RATE_LIMIT_STORAGE": "memory"})
    (tmp_path / "typo").write_text("mongo://app:pa55word@db1/\n")
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"RATE_LIMIT_STORAGE_FILE": str(tmp_path / "typo")})
    assert "RATE_LIMIT_STORAGE_FILE must be 'memory' or a mongodb:// URI" in str(refused.value)
    assert "pa55word" not in str(refused.value)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MASTER_KEY": "tooshort"}, "MASTER_KEY"),
        ({"MASTER_KEY_FILE": "/nonexistent/key"}, "MASTER_KEY_FILE"),
        ({"MASTER_KEY": "x" * 32, "MASTER_KEY_FILE": "/k"}, "MASTER_KEY_FILE"),
        ({"MASTER_KEY_PREVIOUS": "bad"}, "MASTER_KEY_PREVIOUS"),
        ({"MAX_SECRET_BYTES": "64k"}, "MAX_SECRET_BYTES"),
        ({"MAX_SECRET_BYTES": "0"}, "MAX_SECRET_BYTES"),
        ({"MONGO_POOL_SIZE": "-1"}, "MONGO_POOL_SIZE"),
        ({"STORE_TIMEOUT_SECONDS": "soon"}, "STORE_TIMEOUT_SECONDS"),
        ({"STORE_TIMEOUT_SECONDS": "nan"}, "STORE_TIMEOUT_SECONDS"),
        ({"GRACEFUL_TIMEOUT_SECONDS": "-3"}, "GRACEFUL_TIMEOUT_SECONDS"),
        ({"MONGO_JOURNAL": "maybe"}, "MONGO_JOURNAL"),
        ({"MONGO_WRITE_CONCERN": "0"}, "MONGO_WRITE_CONCERN"),
        ({"MONGO_WRITE_CONCERN": "all"}, "MONGO_WRITE_CONCERN"),
        ({"MONGO_DB": "bad.name"}, "MONGO_DB"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"RATE_LIMIT": "1/minute;2/minute"}, "RATE_LIMIT"),
        ({"RATE_LIMIT": "1/second;2/seconds"}, "RATE_LIMIT"),
        ({"RATE_LIMIT_PER_KEY": "fast", "API_KEYS": "ci:" + "t" * 32}, "RATE_LIMIT_PER_KEY"),
        ({"API_KEYS": "ci:too-short"}, "API_KEYS"),
        ({"API_KEYS_FILE": "/nonexistent/keys"}, "API_KEYS_FILE"),
        ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN"),
        ({"READ_TIMEOUT_SECONDS": "0"}, "READ_TIMEOUT_SECONDS"),
        ({"TLS_CERT_FILE": "/etc/hostname"}, "TLS_KEY_FILE"),
        ({"TLS_CERT_FILE": "/nonexistent", "TLS_KEY_FILE": "/nonexistent"}, "TLS_CERT_FILE"),
    ],
)
def test_malformed_values_are_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_env(env)
    assert named in str(excinfo.value)


def test_malformed_key_message_does_not_echo_the_key() -> None:
    value = base64.b64encode(os.urandom(20)).decode()
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_env({"MASTER_KEY": value})
    assert value not in str(excinfo.value)


def test_typed_values_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "MONGO_WRITE_CONCERN": "2",
            "MONGO_JOURNAL": "false",
            "MAX_SECRET_BYTES": "1024",
            "STORE_TIMEOUT_SECONDS": "1.5",
            "LOG_LEVEL": "debug",
        }
    )
    assert settings.mongo_write_concern == 2
    assert settings.mongo_journal is False
    assert settings.max_secret_bytes == 1024
    assert settings.store_timeout_seconds == 1.5
    assert settings.log_level == "DEBUG"


def test_the_per_key_limit_reads_like_the_per_client_one_and_is_off_by_default() -> None:
    keys = {"API_KEYS": "ci:" + "t" * 32}
    assert Settings.from_env(keys).rate_limits_per_key == ()
    settings = Settings.from_env({**keys, "RATE_LIMIT_PER_KEY": "20/second;600/minute"})
    assert settings.rate_limits_per_key == ((20, 1), (600, 60))
    assert settings.rate_limits == ((100, 1), (3000, 60))  # the per-client limit stays
    assert Settings.from_env({**keys, "RATE_LIMIT_PER_KEY": "off"}).rate_limits_per_key == ()


def test_a_per_key_limit_without_api_keys_stops_start_up() -> None:
    # It would limit nothing: an operator who set it would believe callers are held to it.
    for env in ({}, {"METRICS_TOKEN": "m" * 32}):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({**env, "RATE_LIMIT_PER_KEY": "10/second"})
        message = str(refused.value)
        assert message.startswith("RATE_LIMIT_PER_KEY is set but API keys are off")
        assert "API_KEYS_FILE" in message and "\n" not in message
    assert Settings.from_env({"RATE_LIMIT_PER_KEY": "off"}).rate_limits_per_key == ()


def test_client_url_default_and_override() -> None:
    assert client_url({}) == "http://localhost:8000"
    assert client_url({"SECRET_MANAGER_URL": "http://vault:9000"}) == "http://vault:9000"


def test_retired_key_ids_are_a_precise_list_of_key_ids() -> None:
    settings = Settings.from_env(
        {"MASTER_KEY": generate_key(), "RETIRED_KEY_IDS": " F3B719AA7B4E3EAB, 0011223344556677,"}
    )
    # As the guard and rewrap print them: lower case; blanks and a trailing comma ignored.
    assert settings.retired_key_ids == ("f3b719aa7b4e3eab", "0011223344556677")
    assert Settings.from_env({"MASTER_KEY": generate_key()}).retired_key_ids == ()


@pytest.mark.parametrize(
    "value", ["all", "true", "f3b719aa7b4e3ea", "f3b719aa7b4e3eabc", "g3b719aa7b4e3eab"]
)
def test_retired_key_ids_refuses_anything_but_key_ids(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"MASTER_KEY": generate_key(), "RETIRED_KEY_IDS": value})
    assert str(refused.value).startswith("RETIRED_KEY_IDS must be comma-separated key ids")


def test_retired_key_ids_refuses_a_configured_keys_id() -> None:
    active, previous = generate_key(), generate_key()
    for key in (active, previous):
        kid = key_id(parse_key(key))
        with pytest.raises(ConfigError) as refused:
            Settings.from_env(
                {"MASTER_KEY": active, "MASTER_KEY_PREVIOUS": previous, "RETIRED_KEY_IDS": kid}
            )
        assert f"RETIRED_KEY_IDS lists {kid}, the id of a configured key" in str(refused.value)


def test_modes_are_enums_that_still_compare_as_their_text() -> None:
    settings = Settings.from_env(
        {"AUDIT_MODE": "ASYNC", "OTEL_TRACES_EXPORTER": "Console", "LOG_LEVEL": "warning"}
    )
    assert settings.audit_mode is AuditMode.ASYNC
    assert settings.audit_mode == "async"
    assert settings.traces_exporter is TracesExporter.CONSOLE
    assert f"{settings.log_level}" == "WARNING"
    assert settings.rate_limit_storage == RateLimitStorage.MEMORY == "memory"
    shared = Settings.from_env({"RATE_LIMIT_STORAGE": "mongodb://db/"})
    assert shared.rate_limit_storage == "mongodb://db/"


def test_an_empty_value_is_the_default_except_where_it_is_refused() -> None:
    key = generate_key()
    blank = Settings.from_env(
        {"MASTER_KEY": key, "RATE_LIMIT": "", "STORE_TIMEOUT_SECONDS": " ", "DATA_DIR": ""}
    )
    assert blank == Settings.from_env({"MASTER_KEY": key})
    for name in ("MASTER_KEY", "MONGO_DB", "MONGO_WRITE_CONCERN", "API_KEYS", "AUDIT_HMAC_KEY"):
        with pytest.raises(ConfigError) as refused:
            Settings.from_env({"MASTER_KEY": key, name: ""})
        assert name in str(refused.value)


def test_the_dev_key_file_stands_in_only_for_an_unset_master_key(tmp_path: Path) -> None:
    dev, configured = generate_key(), generate_key()
    (tmp_path / "master.key").write_text(dev + "\n")
    dev_key_file = tmp_path / "master.key"
    assert Settings.from_env({}, dev_key_file=dev_key_file).master_key == parse_key(dev)
    chosen = Settings.from_env({"MASTER_KEY": configured}, dev_key_file=dev_key_file)
    assert chosen.master_key == parse_key(configured)


def _environment_uses(path: Path) -> list[str]:
    """Each ``os.environ`` / ``os.getenv`` / ``os.putenv`` in a file, as ``line: source``."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    names = {"environ", "environb", "getenv", "putenv", "unsetenv"}
    found = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in names
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    ]
    found += [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module == "os"
        and any(alias.name in names for alias in node.names)
    ]
    lines = source.splitlines()
    return [f"{line}: {lines[line - 1].strip()}" for line in sorted(found)]


def test_nothing_but_the_settings_reads_the_environment() -> None:
    """Two exceptions: serve writes PROMETHEUS_MULTIPROC_DIR, which prometheus_client itself
    reads in each spawned worker (vault/cli/serve.py says why); vault.client, which must not
    import the server's settings, reads the two client variables they declare, in one
    place (tests/test_client.py checks it reads them as the commands do)."""
    uses = {
        str(path.relative_to(ROOT)): found
        for package in ("vault", "middleware", "observability")
        for path in sorted((ROOT / package).rglob("*.py"))
        if not path.is_relative_to(ROOT / "vault" / "settings")
        if (found := _environment_uses(path))
    }
    assert list(uses) == ["vault/cli/serve.py", "vault/client.py"]
    [write] = uses["vault/cli/serve.py"]
    assert write.endswith('os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)')
    [read] = uses["vault/client.py"]
    assert read.endswith("env = os.environ if environ is None else environ")
    assert {URL_VARIABLE, TOKEN_VARIABLE} <= {variable.name for variable in all_variables()}
    # The walk sees the settings' own reads.
    assert _environment_uses(ROOT / "vault" / "settings" / "__init__.py")
