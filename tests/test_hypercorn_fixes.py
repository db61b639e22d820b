"""vault/hypercorn_fixes.py: written for one Hypercorn release, refused on any other.

The fixes' behaviour is tested end to end where a user meets it (tests/test_shutdown.py,
tests/test_hostile.py); here, the guard that keeps them from patching other internals.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT
from vault.errors import ConfigError
from vault.hypercorn_fixes import HYPERCORN_VERSION, PATCHED, REQUIRED, Target, check


@pytest.mark.parametrize("target", REQUIRED, ids=str)
def test_every_attribute_the_fixes_patch_or_call_exists(target: Target) -> None:
    target.resolve()  # raises ImportError or AttributeError when Hypercorn lacks it


def test_the_installed_hypercorn_passes_the_start_up_check() -> None:
    check()


def test_pyproject_pins_exactly_the_release_the_fixes_are_written_for() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (hypercorn,) = [
        Requirement(line)
        for line in project["dependencies"]
        if Requirement(line).name.lower() == "hypercorn"
    ]
    assert str(hypercorn.specifier) == f"=={HYPERCORN_VERSION}"


def _refusal(version: str | None, required: tuple[Target, ...] = REQUIRED) -> str:
    with pytest.raises(ConfigError) as refused:
        check(version, required)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_another_release_is_refused_in_one_line_naming_both_versions() -> None:
    message = _refusal("0.17.3")
    assert message.startswith("Hypercorn 0.17.3 is installed, but vault/hypercorn_fixes.py")
    assert f"install hypercorn=={HYPERCORN_VERSION}" in message


def test_a_missing_attribute_is_refused_in_one_line_naming_it() -> None:
    gone = Target("hypercorn.asyncio.tcp_server", "TCPServer._idle_timeout_renamed")
    message = _refusal(HYPERCORN_VERSION, (*REQUIRED, gone))
    assert message.startswith(
        "hypercorn.asyncio.tcp_server.TCPServer._idle_timeout_renamed is missing"
    )


def test_a_missing_module_is_refused_in_one_line_naming_the_attribute() -> None:
    gone = Target("hypercorn.protocol.h2_renamed", "H2Protocol.handle")
    assert _refusal(HYPERCORN_VERSION, (gone,)).startswith(
        "hypercorn.protocol.h2_renamed.H2Protocol.handle is missing"
    )


def test_apply_replaces_exactly_the_listed_attributes() -> None:
    """In a child process, so this test session's own Hypercorn stays unpatched."""
    script = (
        "from vault import hypercorn_fixes as f\n"
        "before = {t: t.resolve() for t in f.REQUIRED}\n"
        "f.apply()\n"
        "print(sorted(str(t) for t in f.REQUIRED if t.resolve() is not before[t]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(str(target) for target in PATCHED))
