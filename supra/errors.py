"""User mistakes: the one exception type the CLI prints as `supra: error: <one line>` (exit 2), and
the checks every command shares (output directories, numeric ranges).

Library code raises a subclass (ConfigError, DataError, SourceError, ...) so a caller can tell
them apart, and the CLI catches this one type; any other exception is a bug and keeps its traceback.
This module imports nothing of supra's, so every part of it can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """Something the user can fix; the message is one line saying what was wrong and what is valid."""


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into an existing non-empty directory (or onto a file) unless overwrite=true."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file, not a directory; choose another out=")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} exists and is not empty; pass overwrite=true or another out=")


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: lo/hi bounds (None: unbounded), each open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False  # None (null) is valid too

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            bounds = f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            bounds = f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            bounds = f" {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            bounds = ""
        return kind + bounds + (" or null" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)


def count(lo: int = 0, optional: bool = False) -> Range:
    """An integer >= lo."""
    return Range(lo=lo, integer=True, optional=optional)


POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
FRACTION = Range(lo=0, hi=1, hi_open=True)  # [0, 1)


def check_ranges(values: Any, rules: dict[str, Range], error: type[UserError] = UserError,
                 prefix: str = "") -> None:
    """Check every setting a rule names; `values` is nested dicts/lists, rule keys are dotted paths
    where `*` stands for each item of a list (train.stages.*.lr)."""
    for path, rule in rules.items():
        for name, value in _lookup(values, path.split("."), prefix.rstrip(".")):
            if not rule.accepts(value):
                raise error(f"{name} must be {rule}, got {value!r}")


def _lookup(node: Any, parts: list[str], prefix: str) -> list[tuple[str, Any]]:
    if not parts:
        return [(prefix, node)]
    head, rest = parts[0], parts[1:]
    if head == "*":
        if not isinstance(node, (list, tuple)):
            return []
        return [hit for i, item in enumerate(node) for hit in _lookup(item, rest, f"{prefix}[{i}]")]
    if not isinstance(node, dict) or head not in node:
        return []
    return _lookup(node[head], rest, f"{prefix}.{head}" if prefix else head)
