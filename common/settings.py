"""Reading a part's settings from SAX_* environment variables, with CLI flags over them.

Each part keeps one frozen settings dataclass; its `from_env` reads the variables through
`Env` and lays the flags over them with `with_flags`. The defaults every part agrees on
(the cell, the admin's address, the ports) are here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, TypeVar

DEFAULT_CELL = "/sax/test"
ADMIN_PORT = 10000
MODEL_SERVER_PORT = 10001
FRONTEND_PORT = 8888
DEFAULT_ADMIN = f"localhost:{ADMIN_PORT}"

T = TypeVar("T")


class Env:
    """Typed reads of environment variables: an unset or empty variable gives the default; a
    value that does not parse is a ValueError naming the variable."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env: Mapping[str, str] = os.environ if env is None else env

    def raw(self, name: str, default: str) -> str:
        """The value as set, even when empty (for variables where "" means "off")."""
        return self.env.get(name, default)

    def text(self, name: str, default: str | None = None) -> str | None:
        return self.env.get(name) or default

    def integer(self, name: str, default: int | None = None) -> int | None:
        return self._parse(name, default, int, "an integer")

    def number(self, name: str, default: float | None = None) -> float | None:
        return self._parse(name, default, float, "a number")

    def csv(self, name: str) -> tuple[str, ...]:
        """'a, b,,c' -> ('a', 'b', 'c')."""
        return split_csv(self.env.get(name))

    def _parse(self, name: str, default: Any, kind: type, what: str) -> Any:
        value = self.env.get(name)
        if not value:
            return default
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name} must be {what}, got {value!r}") from None


def split_csv(text: str | None) -> tuple[str, ...]:
    return tuple(v for v in (part.strip() for part in (text or "").split(",")) if v)


def with_flags(base: T, flags: Mapping[str, Any]) -> T:
    """`base` (a settings dataclass) with the fields `flags` names replaced; flags left unset
    (None) and names that are no field are passed over."""
    known = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    return dataclasses.replace(base, **{k: v for k, v in flags.items() if k in known and v is not None})  # type: ignore[type-var]
