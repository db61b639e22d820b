"""The checkouts the benchmark's servers run: its own, and previous revisions to compare with.

A server imports ``vault``, ``middleware`` and ``observability`` from the one directory on
its PYTHONPATH. A package that directory lacks would silently come from elsewhere (an
editable install of another checkout), mixing two revisions in one server: ``check_source``
refuses such a directory before the run starts. ``revision`` names a checkout for the tables.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtests.processes import ClusterError

PACKAGES = ("vault", "middleware", "observability")

# Imports what `python -m vault serve` imports (the command line and the app factory with
# its middleware), then prints where each of the service's modules came from.
_WHERE_FROM = f"""
import importlib, sys
importlib.import_module("vault.cli")
importlib.import_module("vault.app")
for name, module in sorted(sys.modules.items()):
    if name.partition(".")[0] in {PACKAGES!r}:
        for path in [getattr(module, "__file__", None), *getattr(module, "__path__", [])]:
            if path:
                print(name, path)
"""


def _git(source: Path, *args: str) -> str:
    return subprocess.run(  # noqa: S603 - our own arguments, no shell
        ["git", "-C", str(source), *args],  # noqa: S607 - git from PATH, as a user runs it
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip


def revision(source: Path) -> str | None:
    """The short hash of the commit checked out at ``source``, ``-dirty`` when tracked files
    differ from it; None when ``source`` is not the top of a git checkout (``git archive``)."""
    try:
        if Path(_git(source, "rev-parse", "--show-toplevel")).resolve() != source.resolve():
            return None  # a directory inside some other checkout: not its revision
        short = _git(source, "rev-parse", "--short", "HEAD")
        dirty = _git(source, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return f"{short}-dirty" if dirty else short


def check_source(source: Path, env: dict[str, str], cwd: Path) -> None:
    """Refuse (ClusterError) a checkout whose server would not import all of the service's
    modules from ``source`` itself, run with ``env`` and PYTHONPATH=``source`` in ``cwd``."""
    result = subprocess.run(  # noqa: S603 - our own arguments, no shell
        [sys.executable, "-c", _WHERE_FROM],
        env={**env, "PYTHONPATH": str(source)},
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-10:])
        raise ClusterError(f"the service at {source} does not import:\n{tail}")
    root = source.resolve()
    elsewhere: dict[str, str] = {}  # package: the first of its files from outside ``source``
    for line in result.stdout.splitlines():
        name, path = line.split(" ", 1)
        if not Path(path).resolve().is_relative_to(root):
            elsewhere.setdefault(name.partition(".")[0], path)
    if elsewhere:
        found = "; ".join(f"{name} from {path}" for name, path in sorted(elsewhere.items()))
        raise ClusterError(
            f"{source} is not a whole checkout of the service: its server would import {found}"
        )
