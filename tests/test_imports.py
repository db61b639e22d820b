"""Imports flow one way: cli → app → middleware and routes → crypto and stores → observability.

Every import in vault/, middleware/ and observability/ is read from the source (the AST, so
imports inside functions count too) and checked against the rules below. A layer that
needs something from a layer above it is handed it through a constructor instead.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("vault", "middleware", "observability")
# Handed to the layers above them, never importing from them.
BELOW_MIDDLEWARE = (
    "vault.settings",
    "vault.apikeys",
    "vault.crypto",
    "vault.records",
    "vault.stores",
)
# What vault.routes may share with the middleware: the request's state and outcome names.
ROUTES_MAY_IMPORT = ("middleware.context", "middleware.outcomes")


def _under(name: str, *prefixes: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The project modules a file imports (``from pkg import mod`` names ``pkg.mod``)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this file's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if _is_module(child) else base)
    return {name for name in found if _under(name, *PACKAGES) and name != module}


def forbidden(importer: str, target: str) -> str | None:
    """Why ``importer`` may not import ``target``, or None when the direction allows it."""
    if _under(importer, "observability") and _under(target, "vault", "middleware"):
        return "observability is the bottom layer: it imports nothing from vault/ or middleware/"
    if importer == "vault.records" and _under(target, *PACKAGES):
        return "vault/records.py (the stored shape) imports nothing from the project"
    if importer == "vault.crypto" and _under(target, *PACKAGES) and target != "vault.records":
        return "vault/crypto.py imports only vault/records.py from the project"
    if _under(importer, *BELOW_MIDDLEWARE) and (
        _under(target, "middleware", "vault.routes", "vault.app", "vault.cli")
    ):
        return "settings, crypto and stores sit below middleware, routes, app and cli"
    if _under(importer, "middleware") and _under(
        target, "vault.stores", "vault.app", "vault.cli", "vault.routes"
    ):
        return "a middleware is handed a store or sink through its constructor, never imports it"
    if (
        importer == "vault.routes"
        and _under(target, "middleware")
        and not _under(target, *ROUTES_MAY_IMPORT)
    ):
        return "routes share only the request context and outcome names with middleware"
    if _under(target, "vault.cli") and not _under(importer, "vault.cli", "vault.__main__"):
        return "only the entry point (vault/__main__.py) imports the command line"
    if _under(target, "vault.app") and not _under(importer, "vault.app", "vault.cli"):
        return "only the command line imports the app factory"
    return None


def project_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_every_import_follows_the_direction() -> None:
    violations = [
        f"{_module_name(path)} imports {target}: {why}"
        for path in project_files()
        for target in sorted(imports_of(path))
        if (why := forbidden(_module_name(path), target)) is not None
    ]
    assert violations == []


def test_the_walk_sees_imports_at_top_level_and_inside_functions() -> None:
    # Guards the test above against passing because it read nothing.
    app = imports_of(ROOT / "vault" / "app.py")
    assert {"middleware.audit", "vault.routes", "vault.hypercorn_fixes"} <= app  # top level
    assert {"vault.stores.mongo", "vault.stores.sqlite"} <= app  # inside build_store
    assert len(project_files()) > 30


@pytest.mark.parametrize(
    ("importer", "target"),
    [
        ("vault.settings", "vault.apikeys"),
        ("vault.crypto", "vault.records"),
        ("vault.stores.sqlite", "observability.metrics"),
        ("vault.app", "middleware.audit"),
        ("vault.routes", "middleware.outcomes"),
        ("vault.routes", "middleware.context"),
        ("middleware.apikeys", "vault.apikeys"),
        ("vault.cli", "vault.app"),
    ],
)
def test_the_direction_allows(importer: str, target: str) -> None:
    assert forbidden(importer, target) is None


@pytest.mark.parametrize(
    ("importer", "target"),
    [
        ("observability.metrics", "vault.stores.base"),
        ("observability.tracing", "middleware.context"),
        ("vault.crypto", "vault.stores.base"),  # what used to pull in Prometheus and bson
        ("vault.settings", "middleware.apikeys"),  # where the key parsers used to be
        ("vault.apikeys", "middleware.outcomes"),
        ("vault.records", "observability.metrics"),
        ("vault.stores.mongo", "middleware.audit.record"),
        ("vault.stores.base", "vault.routes"),
        ("middleware.audit.writer", "vault.stores.base"),
        ("middleware.ratelimit", "vault.app"),
        ("vault.routes", "middleware.apikeys"),
        ("vault.workers", "vault.app"),
        ("vault.app", "vault.cli"),
    ],
)
def test_the_direction_refuses(importer: str, target: str) -> None:
    assert forbidden(importer, target) is not None


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
