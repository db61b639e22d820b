"""vault/apikeys.py: API_KEYS and METRICS_TOKEN parsed into names, tenants, scopes and
token digests; API_KEYS_FILE re-read into the table in force."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from tests.middleware.test_apikeys import ALICE, BOB, CAROL, KEYS_FILE, METRICS
from vault.apikeys import (
    DEFAULT_TENANT,
    SCOPES,
    KeyTable,
    LiveKeys,
    parse_api_keys,
    parse_key_table,
    parse_token,
    read_key_file,
    reload_key_file,
    token_digest,
)
from vault.errors import ConfigError, InvalidAPIKeys
from vault.settings import Settings


def test_parse_file_with_comments_blank_lines_and_crlf() -> None:
    text = "\ufeff" + KEYS_FILE.replace("\n", "\r\n") + f"\n\n  carol:{CAROL}  \n"
    assert parse_api_keys(text, source="API_KEYS_FILE") == {
        "alice": token_digest(ALICE),
        "bob": token_digest(BOB),
        "carol": token_digest(CAROL),
    }


def test_parse_comma_separated_variable() -> None:
    text = f"alice:{ALICE}, bob:{BOB},"
    assert parse_api_keys(text, source="API_KEYS") == {
        "alice": token_digest(ALICE),
        "bob": token_digest(BOB),
    }


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        (f"# keys\nalice:{ALICE}\nalice:{BOB}\n", "line 3", "already used at line 2"),
        (f"alice:{ALICE}\nbob:{ALICE}\n", "line 2", "token is already used at line 1"),
        (f"\n\nalice:{ALICE[:31]}\n", "line 3", "shorter than 32"),
        (f"alice:{ALICE} trailing\n", "line 1", "characters a Bearer header cannot carry"),
        (f"alice:{ALICE[:20]} {ALICE[20:]}\n", "line 1", "cannot carry"),
        (f"alice:{ALICE}é\n", "line 1", "cannot carry"),
        ("alice:\n", "line 1", "token is empty"),
        (f"{ALICE}\n", "line 1", "no ':' found"),
        (f"al ice:{ALICE}\n", "line 1", "key name is 1-64"),
        (f"{'a' * 65}:{ALICE}\n", "line 1", "key name is 1-64"),
        (f":{ALICE}\n", "line 1", "key name is 1-64"),
        # A tenant may come before one '/' (acme/billing), the name after it as before.
        (f"alice/1 2:{ALICE}\n", "line 1", "key name is 1-64"),
        (f"{ALICE}:alice\n", "line 1", "shorter than 32"),  # swapped: the token is the name
    ],
)
@pytest.mark.parametrize("source", ["API_KEYS_FILE", "API_KEYS"])
def test_parse_errors_name_source_and_line_never_the_token(
    text: str, where: str, reason: str, source: str
) -> None:
    with pytest.raises(InvalidAPIKeys) as caught:
        parse_api_keys(text, source=source)
    message = str(caught.value)
    assert message.startswith(f"{source} {where}: ")
    assert reason in message
    for token in (ALICE, BOB):
        assert token not in message
        assert token[:20] not in message and token[20:] not in message


def test_parse_error_in_comma_form_names_the_entry() -> None:
    with pytest.raises(InvalidAPIKeys, match=r"^API_KEYS line 1, entry 2: .*shorter than 32"):
        parse_api_keys(f"alice:{ALICE},bob:{BOB[:10]}", source="API_KEYS")


@pytest.mark.parametrize("text", ["", "\n  \n", "# alice:only-a-comment\n", " , ,"])
def test_parse_refuses_a_setting_without_keys(text: str) -> None:
    # Set but empty is a mistake, not a way to turn the keys off: fail closed.
    with pytest.raises(InvalidAPIKeys, match=r"^API_KEYS_FILE holds no keys"):
        parse_api_keys(text, source="API_KEYS_FILE")


def test_parse_token() -> None:
    assert parse_token(f"  {METRICS}\n", source="METRICS_TOKEN") == token_digest(METRICS)
    with pytest.raises(InvalidAPIKeys, match=r"^METRICS_TOKEN: .*shorter than 32") as caught:
        parse_token(METRICS[:31], source="METRICS_TOKEN")
    assert METRICS[:31] not in str(caught.value)
    assert issubclass(InvalidAPIKeys, ValueError)


# --- scopes and tenants ------------------------------------------------------------------

TOKENS = [f"token-{n}-" + "x" * 32 for n in range(6)]
ALL_SCOPES = frozenset({"create", "fetch", "delete", "status"})


def test_scopes_follow_a_second_colon_and_default_to_all() -> None:
    text = (
        f"deployer:{TOKENS[0]}:create+delete\n"
        f"auditor:{TOKENS[1]}:status\n"
        f"reader:{TOKENS[2]}: fetch \n"
        f"admin:{TOKENS[3]}\n"
        f"twice:{TOKENS[4]}:fetch+fetch\n"
    )
    table = parse_key_table(text, source="API_KEYS_FILE")
    assert {key.name: key.scopes for key in table} == {
        "deployer": {"create", "delete"},
        "auditor": {"status"},
        "reader": {"fetch"},
        "admin": ALL_SCOPES,
        "twice": {"fetch"},
    }
    assert set(SCOPES) == ALL_SCOPES
    assert {key.tenant for key in table} == {DEFAULT_TENANT} == {"default"}


def test_a_tenant_comes_before_one_slash() -> None:
    text = (
        f"acme/billing:{TOKENS[0]}:fetch\n"
        f"acme/ci:{TOKENS[1]}\n"
        f"beta/ci:{TOKENS[2]}\n"
        f"ci:{TOKENS[3]}\n"
    )
    table = parse_key_table(text, source="API_KEYS_FILE")
    assert [(key.tenant, key.name, key.label) for key in table] == [
        ("acme", "billing", "acme/billing"),
        ("acme", "ci", "acme/ci"),
        ("beta", "ci", "beta/ci"),
        ("default", "ci", "ci"),
    ]
    assert table.names_in("acme") == {"billing", "ci"}
    assert table.names_in("beta") == {"ci"}
    assert table.names_in("default") == {"ci"}
    assert table.names_in("gamma") == frozenset()
    assert [key.digest for key in table] == [token_digest(token) for token in TOKENS[:4]]
    assert parse_api_keys(text, source="API_KEYS_FILE") == {
        "acme/billing": token_digest(TOKENS[0]),
        "acme/ci": token_digest(TOKENS[1]),
        "beta/ci": token_digest(TOKENS[2]),
        "ci": token_digest(TOKENS[3]),
    }


def test_the_default_tenant_spelt_out_is_the_same_key() -> None:
    table = parse_key_table(f"default/billing:{TOKENS[0]}", source="API_KEYS")
    assert [(key.tenant, key.name, key.label) for key in table] == [
        ("default", "billing", "billing")
    ]
    with pytest.raises(InvalidAPIKeys, match=r"^API_KEYS_FILE line 2: .*already used at line 1"):
        parse_key_table(
            f"billing:{TOKENS[0]}\ndefault/billing:{TOKENS[1]}\n", source="API_KEYS_FILE"
        )


def test_names_are_unique_within_a_tenant_only() -> None:
    with pytest.raises(
        InvalidAPIKeys, match=r"^API_KEYS line 1, entry 3: .*already used in its tenant at line 1"
    ):
        parse_key_table(
            f"acme/ci:{TOKENS[0]},beta/ci:{TOKENS[1]},acme/ci:{TOKENS[2]}", source="API_KEYS"
        )


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (f"ci:{TOKENS[0]}:read", "scope 1 of 1 after the second ':' is not a scope"),
        (f"ci:{TOKENS[0]}:create+Fetch", "scope 2 of 2 after the second ':' is not a scope"),
        (f"ci:{TOKENS[0]}:create fetch", "scope 1 of 1 after the second ':' is not a scope"),
        (f"ci:{TOKENS[0]}:", "the scopes after the second ':' are empty"),
        (f"ci:{TOKENS[0]}:  ", "the scopes after the second ':' are empty"),
        (f"ci:{TOKENS[0]}:create+", "scope 2 of 2 after the second ':' is empty"),
        (f"ci:{TOKENS[0]}:+fetch", "scope 1 of 2 after the second ':' is empty"),
        # Two tokens where one belongs: the second is never repeated, not even a piece.
        (f"ci:{TOKENS[0]}:{TOKENS[1]}", "scope 1 of 1 after the second ':' is not a scope"),
        (f"ci:{TOKENS[0]}:{ALICE}+{BOB}", "scope 1 of 3 after the second ':' is not a scope"),
    ],
)
def test_an_unknown_or_empty_scope_names_the_line_and_the_scopes_never_the_token(
    entry: str, reason: str
) -> None:
    text = f"# keys\nadmin:{TOKENS[5]}\n{entry}\n"
    with pytest.raises(InvalidAPIKeys) as caught:
        parse_key_table(text, source="API_KEYS_FILE")
    message = str(caught.value)
    assert message.startswith("API_KEYS_FILE line 3: ")
    assert reason in message
    assert "scopes are create, fetch, delete, status, joined by '+'" in message
    assert "\n" not in message
    for token in (*TOKENS, ALICE, BOB):
        for piece in (token, token[:16], token[16:], *token.split("+")):
            assert piece not in message


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (f"/billing:{TOKENS[0]}", "a tenant is 1-64 characters"),
        (f"ac me/billing:{TOKENS[0]}", "a tenant is 1-64 characters"),
        (f"{'a' * 65}/billing:{TOKENS[0]}", "a tenant is 1-64 characters"),
        (f"acme/:{TOKENS[0]}", "a key name is 1-64 characters"),
        (f"acme/{'b' * 65}:{TOKENS[0]}", "a key name is 1-64 characters"),
        (f"acme/team/billing:{TOKENS[0]}", "at most one '/'"),
        (f"ci:{TOKENS[0]}:create:fetch", "more than two ':'"),
    ],
)
def test_tenant_and_separator_errors_name_the_line(entry: str, reason: str) -> None:
    with pytest.raises(InvalidAPIKeys) as caught:
        parse_key_table(f"admin:{TOKENS[5]}\n{entry}\n", source="API_KEYS_FILE")
    message = str(caught.value)
    assert message.startswith("API_KEYS_FILE line 2: ")
    assert reason in message
    assert TOKENS[0] not in message


def test_settings_keep_the_table_and_the_file_it_came_from(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"acme/ci:{TOKENS[0]}:create\nops:{TOKENS[1]}\n")
    from_file = Settings.from_env({"API_KEYS_FILE": str(keys)})
    assert [(key.label, key.scopes) for key in from_file.api_keys] == [
        ("acme/ci", {"create"}),
        ("ops", ALL_SCOPES),
    ]
    assert from_file.api_keys_file == keys.absolute()
    from_variable = Settings.from_env({"API_KEYS": f"ops:{TOKENS[1]}"})
    assert from_variable.api_keys_file is None
    off = Settings.from_env({})
    assert (off.api_keys, off.api_keys_file) == (KeyTable(), None)
    assert not off.api_keys
    # serve hands the settings to each spawned worker pickled; repr never shows the keys.
    assert pickle.loads(pickle.dumps(from_file)) == from_file  # noqa: S301
    assert TOKENS[0] not in repr(from_file) and "api_keys" not in repr(from_file)


def test_settings_refuse_an_unknown_scope_at_start_up(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"ops:{TOKENS[0]}\nci:{TOKENS[1]}:create+write\n")
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"API_KEYS_FILE": str(keys)})
    assert str(caught.value).startswith("API_KEYS_FILE line 2: scope 2 of 2")
    assert TOKENS[1] not in str(caught.value)


# --- re-reading the key file (SIGHUP) ----------------------------------------------------


def reload_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "secret_manager.apikeys"]


def test_reload_puts_the_files_keys_in_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"ops:{TOKENS[0]}\nci:{TOKENS[1]}\n")
    live = LiveKeys(read_key_file(keys))
    before = live.table
    keys.write_text(f"ops:{TOKENS[0]}:fetch\nacme/deploy:{TOKENS[2]}\n")
    caplog.set_level(logging.INFO)
    assert reload_key_file(live, keys) is True
    assert [(key.label, key.scopes) for key in live.table] == [
        ("ops", {"fetch"}),
        ("acme/deploy", ALL_SCOPES),
    ]
    assert [(key.label, key.scopes) for key in before] == [("ops", ALL_SCOPES), ("ci", ALL_SCOPES)]
    [line] = reload_lines(caplog)
    assert line.levelno == logging.INFO
    assert line.getMessage().startswith(
        "API_KEYS_FILE re-read: 2 keys in force (1 added, 1 removed, 1 changed; process "
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (f"ops:{TOKENS[0]}\nci:{TOKENS[1]}:create+reed\n", "API_KEYS_FILE line 2: scope 2 of 2"),
        (f"ops:{TOKENS[0]}\nci:{TOKENS[1][:20]}\n", "API_KEYS_FILE line 2: the token is shorter"),
        ("# everyone revoked\n", "API_KEYS_FILE holds no keys"),
        (None, "cannot be read: No such file or directory"),
        (b"\xff\xfe", "cannot be read: not UTF-8 text"),
    ],
)
def test_a_file_that_does_not_parse_keeps_the_keys_in_force_and_says_why_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes | None, problem: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"ops:{TOKENS[0]}\nci:{TOKENS[1]}\n")
    live = LiveKeys(read_key_file(keys))
    before = live.table
    if content is None:
        keys.unlink()
    elif isinstance(content, bytes):
        keys.write_bytes(content)
    else:
        keys.write_text(content)
    caplog.set_level(logging.INFO)
    assert reload_key_file(live, keys) is False
    assert live.table is before
    [line] = reload_lines(caplog)
    assert line.levelno == logging.ERROR
    message = line.getMessage()
    assert message.startswith("API_KEYS_FILE not re-read, the 2 keys in force stay (process ")
    assert problem in message
    for token in TOKENS:
        assert token[:20] not in message


def test_reload_with_keys_from_the_environment_has_nothing_to_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    live = LiveKeys(parse_key_table(f"ops:{TOKENS[0]}", source="API_KEYS"))
    before = live.table
    caplog.set_level(logging.INFO)
    assert reload_key_file(live, None) is False
    assert live.table is before
    [line] = reload_lines(caplog)
    assert line.levelno == logging.WARNING
    assert "API_KEYS, which a running process cannot re-read: nothing to re-read" in (
        line.getMessage()
    )
    caplog.clear()
    assert reload_key_file(LiveKeys(KeyTable()), None) is False
    [line] = reload_lines(caplog)
    assert "API keys are off: nothing to re-read" in line.getMessage()
    caplog.clear()
    assert reload_key_file(live, None, quiet=True) is False
    assert reload_lines(caplog) == []


def test_a_quiet_reload_speaks_only_of_a_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"ops:{TOKENS[0]}\n")
    live = LiveKeys(read_key_file(keys))
    caplog.set_level(logging.INFO)
    assert reload_key_file(live, keys, quiet=True) is True
    assert reload_lines(caplog) == []
    keys.write_text(f"ops:{TOKENS[1]}\n")
    assert reload_key_file(live, keys, quiet=True) is True
    [line] = reload_lines(caplog)
    assert "1 keys in force (0 added, 0 removed, 1 changed" in line.getMessage()


def test_the_middleware_and_the_records_name_the_default_tenant_alike() -> None:
    """The key table (middleware, which imports nothing of vault) and the records (vault)
    each spell the default tenant; a secret made by a key without a prefix must be found
    by it, so the two spellings are one."""
    from middleware.apikeys import DEFAULT_TENANT as KEYS_DEFAULT
    from vault.records import DEFAULT_TENANT as RECORDS_DEFAULT

    assert KEYS_DEFAULT == RECORDS_DEFAULT == "default"
