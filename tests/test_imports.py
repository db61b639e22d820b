"""Imports flow one way, as the contracts in pyproject.toml ([tool.importlinter]) say.

`lint-imports` (import-linter) checks every contract on the whole tree; these tests run it,
and plant one upward import per kind of contract in a copy of the tree to show that each
contract refuses what it is there to refuse.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("vault", "middleware", "observability")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_import_contract_is_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("middleware/ratelimit.py", "import vault.breaker", "middleware depends on nothing"),
        ("middleware/context.py", "import vault.stores.base", "middleware depends on nothing"),
        ("observability/metrics.py", "import vault.records", "observability is the bottom"),
        ("vault/stores/sqlite/__init__.py", "import middleware.context", "the stores return data"),
        ("vault/stores/base.py", "import vault.routes", "vault: command line"),
        ("vault/crypto.py", "import vault.stores.base", "vault: command line"),
        ("vault/workers.py", "import vault.app", "vault: command line"),
        ("vault/app.py", "import vault.cli", "vault: command line"),
        ("vault/lifecycle.py", "import prometheus_client", "the domain does no I/O"),
        ("vault/routes.py", "import middleware.apikeys", "routes share only"),
        ("observability/audit.py", "import bson", "the audit record needs no"),
        ("vault/client.py", "import vault.stores.base", "the client is light"),
        ("vault/client.py", "import vault.settings", "the client is light"),
        ("vault/client.py", "import middleware.context", "the client is light"),
        ("vault/client.py", "import starlette.responses", "the client is light"),
        ("vault/client.py", "import pymongo", "the client is light"),
    ],
)
def test_a_planted_upward_import_breaks_its_contract(
    tmp_path: Path, module: str, planted: str, contract: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{planted}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout


def test_records_needs_nothing_but_the_standard_library() -> None:
    tree = ast.parse((ROOT / "vault" / "records.py").read_text(encoding="utf-8"))
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
