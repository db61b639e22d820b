"""How one setting is declared and read from the environment.

A ``Variable`` is one row of the settings table (vault/settings/__init__.py): the name, a
parser (vault/settings/parse.py), the default as it would be written in the environment,
and a line saying what it is for. Reading it covers the ``NAME_FILE`` variant of a secret
(a Docker secret) and an empty value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar, cast

from vault.errors import ConfigError

T = TypeVar("T")


# (text, the variable it came from: NAME or NAME_FILE) → the value, or a ConfigError naming
# that variable.
Parser = Callable[[str, str], T]


@dataclass(frozen=True)
class Variable(Generic[T]):
    """One environment variable: how it is parsed, its default, what it is for."""

    name: str
    parse: Parser[T]
    # As it would be written in the environment; None: unset, the field holds ``unset``.
    default: str | None
    doc: str
    unset: T | None = None
    # Also read from NAME_FILE (a Docker secret); the value is never shown.
    secret: bool = False
    # An empty value means the default; when False it is parsed (and refused) instead.
    blank_is_default: bool = True

    def read(self, env: Mapping[str, str]) -> T | None:
        """This variable's value in ``env``: parsed, or the default when it is not set."""
        raw, source = self._raw(env)
        if raw is None or (self.blank_is_default and not raw.strip()):
            return self.default_value()
        return self.parse(raw, source)

    def default_value(self) -> T | None:
        """What an environment without this variable gives: the default, parsed."""
        return self.unset if self.default is None else self.parse(self.default, self.name)

    def _raw(self, env: Mapping[str, str]) -> tuple[str | None, str]:
        """The text and the variable it came from: NAME, or the file NAME_FILE names."""
        direct = env.get(self.name)
        path = env.get(f"{self.name}_FILE") if self.secret else None
        if path is None:
            return direct, self.name
        if direct is not None:
            raise ConfigError(
                f"{self.name} and {self.name}_FILE are both set; set only one of them"
            )
        try:
            return Path(path).read_text(encoding="utf-8").strip(), f"{self.name}_FILE"
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{self.name}_FILE={path!r} cannot be read: {reason}") from None


def setting(
    name: str,
    parse: Parser[T],
    default: str | None,
    doc: str,
    *,
    unset: T | None = None,
    secret: bool = False,
    blank_is_default: bool = True,
) -> T:
    """A field of Settings read from ``name``; secret values stay out of repr."""
    variable = Variable(name, parse, default, doc, unset, secret, blank_is_default)
    return cast(
        T,
        field(
            default=variable.default_value(),
            repr=not secret,
            metadata={"variable": variable},
        ),
    )
