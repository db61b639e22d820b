"""One error hierarchy: every public exception the service defines derives from VaultError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import vault
from vault.errors import (
    ConfigError,
    CorruptRecord,
    InvalidInput,
    NotReady,
    StoreUnavailable,
    UnreadableRecord,
    VaultError,
)


def _vault_modules() -> list[str]:
    return [
        info.name
        for info in pkgutil.walk_packages(vault.__path__, "vault.")
        if info.name not in ("vault.__main__",)
    ]


def test_every_public_exception_of_the_service_is_a_vault_error() -> None:
    outside = []
    for name in _vault_modules():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attribute.startswith("_")
                and not issubclass(value, VaultError)
            ):
                outside.append(f"{name}.{attribute}")
    assert outside == []
    assert len(_vault_modules()) > 30  # the walk saw the tree, so the check means something


def test_the_hierarchy_says_what_a_caller_can_do() -> None:
    # Bad input is still a ValueError for code that catches that; a record nobody can open
    # is one kind whatever made it so; a store's refusal carries its reason as a field.
    assert issubclass(InvalidInput, ValueError)
    assert issubclass(CorruptRecord, UnreadableRecord)
    assert not issubclass(ConfigError, InvalidInput)
    assert NotReady("disk full").reason == "disk full"
    assert StoreUnavailable("sqlite: SQLITE_FULL").reason is None  # not read from the text
