"""vault/apikeys.py: API_KEYS and METRICS_TOKEN parsed into names and token digests."""

from __future__ import annotations

import pytest

from tests.middleware.test_apikeys import ALICE, BOB, CAROL, KEYS_FILE, METRICS
from vault.apikeys import parse_api_keys, parse_token, token_digest
from vault.errors import InvalidAPIKeys


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
        (f"alice/1:{ALICE}\n", "line 1", "key name is 1-64"),
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
