"""pyproject.toml declares what the code imports, and requirements.lock still satisfies it.

Two ways a dependency goes wrong without any other test noticing: the code imports a package
that only arrives as someone else's dependency (it works until that someone drops it), and
the image's hash-locked requirements fall behind pyproject.toml (the image then installs
versions the project no longer accepts, or lacks a package outright).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from tests.conftest import ROOT

FIRST_PARTY = {"vault", "middleware", "observability", "loadtests", "tests"}
# What each tree may import: the runtime dependencies, plus the extra it runs with.
TREES = {
    "vault": (),
    "middleware": (),
    "observability": (),
    "loadtests": ("loadtest",),
    "tests": ("test",),
}
LOCK = "requirements.lock"
REGENERATE = re.compile(r"^#\s+(pip-compile\s.*)$", re.MULTILINE)


# --- every import is declared ---------------------------------------------------------------


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _declared(extras: tuple[str, ...]) -> set[str]:
    project = _project()
    lines = [*project["dependencies"]]
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(line).name) for line in lines}


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every absolute import in a file, as the dotted names it could load (deepest first)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                # `from a import b`: b may be a module (a namespace package's part) or a name.
                yield node.lineno, f"{node.module}.{alias.name}"


@functools.cache
def _top_level_owners() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _files(distribution: str) -> frozenset[str]:
    files = importlib.metadata.distribution(distribution).files or []
    return frozenset(str(file) for file in files)


def _owners(module: str) -> set[str]:
    """The distributions that provide ``module``, or the deepest package above it.

    A namespace package (``opentelemetry``) is shared by many distributions: the one that
    provides ``opentelemetry/util/http`` is the one ``opentelemetry.util.http`` needs.
    """
    parts = module.split(".")
    candidates = set(_top_level_owners().get(parts[0], ()))
    if len(candidates) <= 1:
        return {canonicalize_name(name) for name in candidates}
    for depth in range(len(parts), 0, -1):
        prefix = "/".join(parts[:depth])
        owners = {
            name
            for name in candidates
            if any(f == f"{prefix}.py" or f.startswith(f"{prefix}/") for f in _files(name))
        }
        if owners:
            return {canonicalize_name(name) for name in owners}
    return set()


def undeclared_imports(root: Path, tree: str, declared: set[str]) -> list[str]:
    """``file:line module (distribution)`` for each third-party import not declared."""
    problems = []
    for path in sorted((root / tree).rglob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "__future__":
                continue
            owners = _owners(module)
            if not owners & declared:
                where = f"{path.relative_to(root)}:{line}"
                problems.append(
                    f"{where} {module} ({', '.join(sorted(owners)) or 'not installed'})"
                )
    return problems


@pytest.mark.parametrize("tree", TREES)
def test_every_third_party_import_is_declared_in_pyproject(tree: str) -> None:
    assert undeclared_imports(ROOT, tree, _declared(TREES[tree])) == []


def test_the_checker_reports_an_undeclared_import(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        "import json\nfrom opentelemetry import trace\nfrom opentelemetry.util.http import x\n"
    )
    declared = {"opentelemetry-api"}  # the instrumentations bring util-http, undeclared here
    assert undeclared_imports(tmp_path, "pkg", declared) == [
        "pkg/mod.py:3 opentelemetry.util.http.x (opentelemetry-util-http)"
    ]


def test_every_runtime_dependency_has_an_upper_bound() -> None:
    unbounded = [
        line
        for line in _project()["dependencies"]
        if not any(spec.operator in ("<", "<=", "==", "~=") for spec in Requirement(line).specifier)
    ]
    assert unbounded == []


# --- requirements.lock satisfies pyproject.toml ---------------------------------------------


def _image_python() -> str:
    """The image's Python release, from the Dockerfile's base image tag (python:3.11.11-...)."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+\.\d+)-", text, re.MULTILINE)
    assert match, "the Dockerfile's PYTHON_IMAGE names no python:X.Y.Z tag"
    return match.group(1)


def image_environment() -> dict[str, str]:
    """Marker values for the image (CPython on Linux), whatever machine runs the tests."""
    full = _image_python()
    environment = dict(default_environment())
    environment.update(
        implementation_name="cpython",
        os_name="posix",
        platform_python_implementation="CPython",
        platform_system="Linux",
        python_full_version=full,
        python_version=".".join(full.split(".")[:2]),
        sys_platform="linux",
    )
    return environment


def _lock_pins(lock: Path) -> tuple[dict[str, Version | None], list[str]]:
    """Each distribution the lock names, with the version it pins (None when the line is
    not a pin); and what is wrong with its lines: each must pin with ``==`` and carry at
    least one ``--hash``."""
    pins: dict[str, Version | None] = {}
    problems: list[str] = []
    for raw in lock.read_text().replace("\\\n", " ").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        text, *options = re.split(r"\s+(?=--)", line)
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            problems.append(f"{lock.name}: {text!r} is not a requirement")
            continue
        name = canonicalize_name(requirement.name)
        pins[name] = None
        specs = list(requirement.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            problems.append(f"{lock.name}: {text!r} is not pinned with ==")
            continue
        if not any(option.startswith("--hash=") for option in options):
            problems.append(f"{lock.name}: {requirement.name} has no --hash")
        try:
            pins[name] = Version(specs[0].version)
        except InvalidVersion:
            problems.append(f"{lock.name}: {text!r} is not pinned with ==")
    return pins, problems


def lock_problems(pyproject: Path, lock: Path, environment: dict[str, str]) -> list[str]:
    """What keeps ``lock`` from installing what pyproject.toml declares (its runtime
    dependencies and its build backend, which the image builds with from the lock too)."""
    pins, problems = _lock_pins(lock)
    data = tomllib.loads(pyproject.read_text())
    declared = [*data["project"]["dependencies"], *data["build-system"]["requires"]]
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue  # not installed in the image at all
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{line!r} is declared in pyproject.toml but not in {lock.name}")
        elif (version := pins[name]) is not None and not requirement.specifier.contains(
            version, prereleases=True
        ):
            problems.append(f"{lock.name} pins {requirement.name}=={version}, outside {line!r}")
    return problems


def test_the_lock_pins_everything_pyproject_declares_with_hashes() -> None:
    problems = lock_problems(ROOT / "pyproject.toml", ROOT / LOCK, image_environment())
    assert problems == [], (
        "regenerate requirements.lock with the command in its header: " + "; ".join(problems)
    )


def test_the_lock_was_made_for_the_images_python_and_says_how() -> None:
    header = (ROOT / LOCK).read_text().split("\n\n", 1)[0]
    minor = ".".join(_image_python().split(".")[:2])
    assert f"autogenerated by pip-compile with Python {minor}\n" in header
    (command,) = REGENERATE.findall(header)
    assert {"--generate-hashes", f"--output-file={LOCK}", "pyproject.toml"} <= set(command.split())


HASH = "--hash=sha256:" + "0" * 64
PYPROJECT = """
[build-system]
requires = ["setuptools>=77"]

[project]
name = "demo"
version = "0"
dependencies = [{dependencies}]
"""


@pytest.mark.parametrize(
    ("dependencies", "lock", "problem"),
    [
        (
            '"starlette>=2,<3"',
            f"starlette==1.10.0 {HASH}\nsetuptools==84.2.1 {HASH}\n",
            "requirements.lock pins starlette==1.10.0, outside 'starlette>=2,<3'",
        ),
        (
            '"starlette>=1,<2", "h2>=4.1,<5"',
            f"starlette==1.10.0 {HASH}\nsetuptools==84.2.1 {HASH}\n",
            "'h2>=4.1,<5' is declared in pyproject.toml but not in requirements.lock",
        ),
        (
            '"starlette>=1,<2"',
            f"starlette==1.10.0 {HASH}\n",
            "'setuptools>=77' is declared in pyproject.toml but not in requirements.lock",
        ),
        (
            '"starlette>=1,<2"',
            f"starlette==1.10.0 \\\n    # via demo\nsetuptools==84.2.1 {HASH}\n",
            "requirements.lock: starlette has no --hash",
        ),
        (
            '"starlette>=1,<2"',
            f"starlette>=1.0 {HASH}\nsetuptools==84.2.1 {HASH}\n",
            "requirements.lock: 'starlette>=1.0' is not pinned with ==",
        ),
    ],
    ids=["version-outside", "missing", "build-backend-missing", "no-hash", "not-pinned"],
)
def test_the_lock_checker_reports_a_mismatch(
    tmp_path: Path, dependencies: str, lock: str, problem: str
) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.format(dependencies=dependencies))
    (tmp_path / LOCK).write_text(lock)
    assert lock_problems(tmp_path / "pyproject.toml", tmp_path / LOCK, image_environment()) == [
        problem
    ]


def test_the_lock_checker_skips_what_the_image_never_installs(tmp_path: Path) -> None:
    windows_only = "\"pywin32>=306; sys_platform == 'win32'\""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.format(dependencies=windows_only))
    (tmp_path / LOCK).write_text(f"setuptools==84.2.1 {HASH}\n")
    assert lock_problems(tmp_path / "pyproject.toml", tmp_path / LOCK, image_environment()) == []
