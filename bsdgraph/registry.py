"""The one way a per-key table is filled: ``registrar(table)`` gives a decorator that enters a function under
one or more keys, and refuses a key that is already taken (two rules for one op is a bug, not an override)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, MutableMapping
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: MutableMapping) -> Callable[..., Callable[[F], F]]:
    def register(*keys: Hashable) -> Callable[[F], F]:
        def add(fn: F) -> F:
            for key in keys:
                if key in table:
                    raise ValueError(f"{key!r} is registered twice: {table[key].__qualname__} and {fn.__qualname__}")
                table[key] = fn
            return fn

        return add

    return register
