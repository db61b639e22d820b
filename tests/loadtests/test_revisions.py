"""The benchmark names a compared checkout by its revision and refuses one its server would
only partly import (the rest coming from another checkout's install)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from loadtests.processes import ClusterError
from loadtests.revisions import check_source, revision
from tests.conftest import ROOT
from tests.loadtests.conftest import git


def test_a_checkout_is_named_by_its_short_hash_and_marked_dirty_once_changed(
    head_checkout: Path,
) -> None:
    short = git(head_checkout, "rev-parse", "--short", "HEAD")
    assert revision(head_checkout) == short
    with (head_checkout / "vault" / "__init__.py").open("a") as handle:
        handle.write("# changed\n")
    assert revision(head_checkout) == f"{short}-dirty"


def test_a_directory_that_is_no_checkouts_top_has_no_revision(tmp_path: Path) -> None:
    # A `git archive` extracted there, or a folder inside some other checkout.
    assert revision(tmp_path) is None
    assert revision(ROOT / "vault") is None


def test_a_whole_checkout_passes_the_import_check(head_checkout: Path, tmp_path: Path) -> None:
    check_source(head_checkout, dict(os.environ), tmp_path)


def test_a_checkout_missing_packages_is_refused_before_the_run(tmp_path: Path) -> None:
    # Only vault: its server would take middleware and observability from wherever the
    # environment finds them (an editable install of another checkout), mixing revisions;
    # without such an install it would not start at all.
    partial = tmp_path / "partial"
    shutil.copytree(ROOT / "vault", partial / "vault")
    with pytest.raises(ClusterError) as refused:
        check_source(partial, dict(os.environ), tmp_path)
    message = str(refused.value)
    if "not a whole checkout" in message:
        assert "middleware from" in message and "observability from" in message
    else:
        assert "No module named 'middleware'" in message


def test_a_checkout_that_does_not_import_is_refused_with_its_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    for package in ("vault", "middleware", "observability"):
        shutil.copytree(ROOT / package, broken / package)
    (broken / "vault" / "app.py").write_text("raise ImportError('half-finished change')\n")
    with pytest.raises(ClusterError, match="half-finished change"):
        check_source(broken, dict(os.environ), tmp_path)


def test_git_is_what_names_the_revision(head_checkout: Path) -> None:
    # The hash comes from the checkout itself, not from this repository's HEAD by chance.
    git(head_checkout, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit",
        "--quiet", "--allow-empty", "-m", "another commit")  # fmt: skip
    assert revision(head_checkout) == git(head_checkout, "rev-parse", "--short", "HEAD")
    assert revision(head_checkout) != subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
