"""``KEY=VALUE`` options of the command line (``--lif``, ``--bsd``), parsed against the schema of what they set.

Every value is converted by the declared type of its key, never guessed: a boolean is one of ``BOOLEANS``
(``recall=maybe`` used to read as true, as did any other string), a number must be finite, a choice one of its
values. Each problem is one line naming the flag and the assignment, and all of them are reported at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


@dataclass(frozen=True)
class Option:
    """What one key accepts: a type (bool, int, float, str, or tuple: comma-separated numbers) and, for a choice,
    its values."""

    type: type
    choices: tuple[Any, ...] | None = None


def parse(flag: str, items: list[str] | None, schema: dict[str, Option]) -> tuple[dict[str, Any], list[str]]:
    """(values by key, problems): ``["v_th=0.6", "reset=soft"]`` -> ``{"v_th": 0.6, "reset": "soft"}``."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in items or []:
        key, sep, raw = (part.strip() for part in item.partition("="))
        where = f"{flag} {item if item.isprintable() else repr(item)}"  # a line break would split the message
        if not sep or not key:
            problems.append(f"{where}: expected KEY=VALUE")
        elif key not in schema:
            problems.append(f"{where}: unknown key {key!r}; known: {', '.join(sorted(schema))}")
        else:
            try:
                values[key] = convert(raw, schema[key])
            except ValueError as err:
                problems.append(f"{where}: {err}")
    return values, problems


def convert(raw: str, option: Option) -> Any:
    """``raw`` as ``option`` declares it, or ValueError saying what was expected."""
    if option.type is bool:
        if raw.lower() not in BOOLEANS:
            raise ValueError(f"expected a boolean ({'/'.join(BOOLEANS)}), got {raw!r}")
        return BOOLEANS[raw.lower()]
    if option.type is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if option.type is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {raw!r}")
        return value
    if option.type is tuple:  # a list of numbers, one per layer: "0.3,0.6,0.9" (empty: none)
        return tuple(convert(part.strip(), Option(float)) for part in raw.split(",")) if raw.strip() else ()
    if option.choices is not None and raw not in option.choices:
        raise ValueError(f"expected one of {', '.join(map(str, option.choices))}, got {raw!r}")
    return raw
